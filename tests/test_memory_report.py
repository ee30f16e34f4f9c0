"""memory_report() counts the bytes of the tensors the cache holds."""

from __future__ import annotations

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from tests.tiny_models import make_tiny_model, random_prompts


def _held_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.stored_tensors().values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [0, 16])
def test_ratio_is_held_bytes_over_dense_bytes(dtype, window):
    model = make_tiny_model("llama", dtype=dtype, head_dim=64, num_attention_heads=2, num_key_value_heads=1, hidden_size=128)
    cache = SubTokenCache(model, SubTokenConfig(num_groups=8, keep_groups=3, window=window))
    tokens = 512
    with torch.no_grad():
        model(input_ids=random_prompts(2, tokens), past_key_values=cache)
    report = cache.memory_report()
    layers, batch, heads, dim = 2, 2, 1, 64
    dense = layers * 2 * batch * heads * tokens * dim * dtype.itemsize
    assert report["dense_bytes"] == dense
    assert report["stored_bytes"] == _held_bytes(cache)
    assert report["ratio"] == pytest.approx(report["stored_bytes"] / dense)
    index_share = 3 / (2 * dim * dtype.itemsize)  # 3 uint8 indices per token and head
    expected = (1 + 3 / 8) / 2 + index_share
    assert report["ratio"] == pytest.approx(expected, rel=0.02)
    if window == 0:
        assert report["ratio"] == pytest.approx(expected, rel=1e-9)


def test_every_group_kept_stores_no_indices():
    """With K = G slot k holds group k: no index is stored, attention sees them implied."""
    model = make_tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1, hidden_size=128)
    # no floor: these 64 tokens are packed, not held dense as a short context
    cache = SubTokenCache(model, SubTokenConfig(num_groups=4, keep_groups=4, window=0, floor_tokens=0))
    tokens = 64
    with torch.no_grad():
        model(input_ids=random_prompts(1, tokens), past_key_values=cache)
    layer = cache.layers[0]
    assert "group_idx" not in layer.stored_tensors()
    assert cache.memory_report()["ratio"] == pytest.approx(1.0)  # exactly the dense bytes
    implied = layer._group_idx_view()  # [B, Hkv, K, Ts], zero-stride over tokens
    assert implied.shape == (1, 1, 4, tokens) and implied.stride(-1) == 0
    assert implied[0, 0, :, 5].tolist() == [0, 1, 2, 3]


def test_report_grows_in_chunks_during_decoding():
    model = make_tiny_model("llama")
    # no floor: a 32-token context is packed as it grows, not held dense
    cache = SubTokenCache(model, SubTokenConfig(num_groups=8, keep_groups=2, window=8, pack_chunk=4, floor_tokens=0))
    with torch.no_grad():
        model(input_ids=random_prompts(1, 20), past_key_values=cache)
        packed_counts = []
        for step in range(12):
            model(input_ids=random_prompts(1, 1, seed=step), past_key_values=cache)
            packed_counts.append(cache.memory_report()["tokens_packed"])
    layer = cache.layers[0]
    assert cache.get_seq_length() == 32
    assert layer.window_keys.shape[-2] <= 8
    # packing happens in chunks of 4, never one token per step
    assert all(b - a in (0, 4) for a, b in zip(packed_counts, packed_counts[1:], strict=False))
    assert packed_counts[-1] + layer.window_keys.shape[-2] == 32


def test_no_dense_values_are_held():
    model = make_tiny_model("llama")
    # no floor: these 100 tokens are packed, not held dense as a short context
    cache = SubTokenCache(model, SubTokenConfig(num_groups=8, keep_groups=2, window=4, floor_tokens=0))
    with torch.no_grad():
        model(input_ids=random_prompts(1, 100), past_key_values=cache)
    for layer in cache.layers:
        assert layer.packed_values.shape[2] == 2  # K slots, not G
        assert layer.window_values.shape[-2] <= 4
        # window tensors do not keep the prompt's storage alive
        assert layer.window_values.untyped_storage().nbytes() == layer.window_values.numel() * 4
