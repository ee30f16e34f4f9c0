"""With keep_groups < num_groups, attention must equal dense attention over zero-filled dropped groups."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.kernels import packed_attention, packed_attention_reference
from hf_subtok.kernels.pack_reference import pack_value_groups, unpack_value_groups
from hf_subtok.views import PackedKV
from tests.tiny_models import make_tiny_model, random_prompts

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _dense_reference(query, keys, values, mask, scaling):
    group = query.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(
        query.float(), keys.float(), values.float(), attn_mask=mask, scale=scaling
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("keep", [1, 3, 7, 8])
@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("block_tokens", [1024, 16], ids=["one-block", "blocks-of-16"])
def test_packed_attention_equals_zero_filled_dense(dtype, keep, q_len, group, block_tokens, monkeypatch):
    """37 packed tokens read in one block, or in blocks of 16, 16 and 5 (buffers reused)."""
    monkeypatch.setattr(packed_attention_reference, "BLOCK_TOKENS", block_tokens)
    torch.manual_seed(keep * 10 + q_len)
    batch, heads, stored, tail, dim, groups = 2, 2, 37, 9, 64, 8
    keys = torch.randn(batch, heads, stored + tail, dim, dtype=dtype)
    values = torch.randn(batch, heads, stored + tail, dim, dtype=dtype)
    query = torch.randn(batch, heads * group, q_len, dim, dtype=dtype)
    scores = torch.rand(batch, heads, stored, groups)
    packed, idx = pack_value_groups(values[:, :, :stored], scores, keep)
    kv = PackedKV(keys[:, :, :stored], packed, idx, groups, keys[:, :, stored:], values[:, :, stored:])
    mask = torch.rand(batch, 1, q_len, stored + tail) > 0.2
    mask[..., -1] = True
    got = packed_attention(query, kv, mask, scaling=0.125)
    zero_filled = torch.cat([unpack_value_groups(packed, idx, groups), values[:, :, stored:]], dim=2)
    want = _dense_reference(query, keys, zero_filled, mask, 0.125)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **TOLERANCE[dtype])


@pytest.mark.parametrize("selected", [False, True], ids=["position-order", "selected-per-head"])
def test_queries_of_a_chunk_are_causal_over_the_tail_without_a_mask(selected):
    """Q > 1 with no attention mask: each of the Q queries (the last Q tail positions) sees every
    packed token and the tail up to itself, whether the packed tokens are in position order or
    selected per head (`stored_valid`, here with one filler slot per row)."""
    torch.manual_seed(3)
    batch, heads, stored, tail, q_len, dim, groups = 2, 2, 12, 7, 4, 16, 4
    keys = torch.randn(batch, heads, stored + tail, dim)
    values = torch.randn(batch, heads, stored + tail, dim)
    query = torch.randn(batch, heads, q_len, dim)
    packed, idx = pack_value_groups(values[:, :, :stored], torch.rand(batch, heads, stored, groups), 2)
    valid = torch.ones(batch, heads, stored, dtype=torch.bool)
    if selected:
        valid[:, :, 5] = False  # a filler slot: never attended
    kv = PackedKV(
        keys[:, :, :stored], packed, idx, groups, keys[:, :, stored:], values[:, :, stored:],
        stored_valid=valid if selected else None,
    )
    got = packed_attention(query, kv)
    allowed = torch.ones(batch, heads, q_len, stored + tail, dtype=torch.bool)
    allowed[..., :stored] &= valid.unsqueeze(2)
    query_pos = torch.arange(tail - q_len, tail).view(q_len, 1)
    allowed[..., stored:] &= torch.arange(tail).view(1, tail) <= query_pos
    zero_filled = torch.cat([unpack_value_groups(packed, idx, groups), values[:, :, stored:]], dim=2)
    want = _dense_reference(query, keys, zero_filled, allowed, None)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


def test_pack_keeps_the_largest_norm_groups():
    values = torch.zeros(1, 1, 2, 8)
    values[0, 0, 0] = torch.tensor([0.1, 5.0, 0.2, -4.0, 0.0, 0.3, 0.0, 0.0])
    values[0, 0, 1] = torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -9.0])
    from hf_subtok.scorers import get_group_scorer

    scores = get_group_scorer("value_norm").score_groups(values, values, 8)
    packed, idx = pack_value_groups(values, scores, 2)
    assert idx[0, 0, :, 0].tolist() == [1, 3]
    assert idx[0, 0, :, 1].tolist() == [0, 7]
    assert packed[0, 0, :, 1, 0].tolist() == [3.0, -9.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_layer_matches_zero_filled_dense_cache(dtype):
    """Through the model: each layer's attention output equals a DynamicCache holding the same
    keys and the packed values with dropped groups set to zero."""
    model = make_tiny_model("qwen3", dtype=dtype, num_hidden_layers=3)
    config = SubTokenConfig(num_groups=4, keep_groups=2, window=6, pack_chunk=3)
    ours = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(1, 50), past_key_values=ours)
    dense = DynamicCache()
    for layer_idx, layer in enumerate(ours.layers):
        keys = torch.cat([layer.packed_keys, layer.window_keys], dim=-2)
        values = torch.cat(
            [unpack_value_groups(layer.packed_values, layer.group_idx, 4), layer.window_values], dim=-2
        )
        dense.update(keys, values, layer_idx)

    captured: dict[str, list[torch.Tensor]] = {"ours": [], "dense": []}

    def run(cache, name):
        hooks = [
            block.self_attn.register_forward_hook(lambda mod, args, out: captured[name].append(out[0].float()))
            for block in model.model.layers
        ]
        try:
            with torch.no_grad():
                model(input_ids=random_prompts(1, 1, seed=3), past_key_values=cache)
        finally:
            for hook in hooks:
                hook.remove()

    run(ours, "ours")
    run(dense, "dense")
    for got, want in zip(captured["ours"], captured["dense"], strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("keep", [8, 3])
def test_value_matmul_over_no_tokens_is_zero(keep):
    """A row without packed tokens contributes zeros (every group kept, or some)."""
    values = torch.randn(1, 2, keep, 0, 8)  # [B, Hkv, K, T=0, C]
    group_idx = torch.zeros(1, 2, keep, 0, dtype=torch.uint8)
    out = packed_attention_reference.packed_value_matmul(torch.rand(1, 2, 3, 0), values, group_idx, 8)
    assert out.shape == (1, 2, 3, 64)
    assert torch.equal(out, torch.zeros_like(out))


def test_bf16_values_over_many_blocks_keep_their_precision(monkeypatch):
    """K < G in bfloat16 over 256 blocks of 16 tokens: the blocks are summed in float32, so the
    error stays at one bfloat16 rounding (about 3e-3), not one per block (2e-2 when summed in
    bfloat16)."""
    monkeypatch.setattr(packed_attention_reference, "BLOCK_TOKENS", 16)
    torch.manual_seed(0)
    values = torch.randn(1, 2, 4096, 64)
    packed, idx = pack_value_groups(values, torch.rand(1, 2, 4096, 8), 4)
    probs = torch.softmax(torch.randn(1, 2, 3, 4096) * 0.1, dim=-1)  # near uniform: every block counts
    want = probs.double() @ unpack_value_groups(packed, idx, 8).double()
    got = packed_attention_reference.packed_value_matmul(probs.bfloat16(), packed.bfloat16(), idx, 8)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - want).norm() / want.norm()).item() < 6e-3
