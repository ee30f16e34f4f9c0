"""Hadamard-rotated quantized storage (`rotate=True`): attention is computed in the rotated space
and equals attention over the stored tensors rotated back."""

from __future__ import annotations

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.attention import subtok_attention
from hf_subtok.kernels import packed_attention_reference
from hf_subtok.quant import quantize, quantize_channels
from hf_subtok.quant.rotation import hadamard, rotate_groups
from hf_subtok.views import PackedKV
from tests.tiny_models import greedy_per_backend, make_tiny_model, random_prompts

_WIDE = dict(head_dim=64, num_attention_heads=2, num_key_value_heads=1, hidden_size=128)


@pytest.mark.parametrize("size", [1, 2, 32, 64])
def test_hadamard_is_orthonormal_and_its_own_inverse(size):
    matrix = hadamard(size)
    torch.testing.assert_close(matrix @ matrix, torch.eye(size), atol=1e-6, rtol=0)
    torch.testing.assert_close(matrix, matrix.T)
    x = torch.randn(3, 2 * size)
    torch.testing.assert_close(rotate_groups(rotate_groups(x, matrix), matrix), x, atol=1e-5, rtol=0)


def test_hadamard_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="size must be a power of two, got 24"):
        hadamard(24)


def test_rotation_spreads_an_outlier_channel():
    """Why rotate: one huge channel sets the scale of its whole group; rotated, it is spread
    over the group and the other channels come back far more precisely."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 256, 32, generator=generator)
    x[..., 5] *= 50
    rotation = hadamard(32)
    plain = quantize(x, 2, 32).dequantize(torch.float32)
    rotated = rotate_groups(quantize(rotate_groups(x, rotation), 2, 32).dequantize(torch.float32), rotation)
    others = [c for c in range(32) if c != 5]
    assert (rotated - x)[..., others].norm() < 0.7 * (plain - x)[..., others].norm()


@pytest.mark.parametrize("keys_per_channel", [True, False], ids=["keys-per-channel", "keys-per-token"])
def test_attention_in_the_rotated_space_equals_attention_over_the_unrotated_tensors(keys_per_channel):
    generator = torch.Generator().manual_seed(1)
    batch, kv_heads, q_heads, stored, tail, dim, groups = 2, 2, 4, 37, 5, 64, 2
    width = dim // groups
    keys = torch.randn(batch, kv_heads, stored, dim, generator=generator)
    values = torch.randn(batch, kv_heads, groups, stored, width, generator=generator)  # [B, Hkv, K, Ts, C]
    key_rot, value_rot = hadamard(dim), hadamard(width)
    rotated_keys = rotate_groups(keys, key_rot)
    stored_keys = (
        quantize_channels(rotated_keys, 4, 32) if keys_per_channel else quantize(rotated_keys, 4, 32)
    )
    stored_values = quantize(rotate_groups(values, value_rot), 4, 32)
    group_idx = torch.arange(groups, dtype=torch.uint8).view(1, 1, groups, 1).expand(batch, kv_heads, groups, stored)
    tail_keys = torch.randn(batch, kv_heads, tail, dim, generator=generator)
    tail_values = torch.randn(batch, kv_heads, tail, dim, generator=generator)
    query = torch.randn(batch, q_heads, 1, dim, generator=generator)
    kv = PackedKV(stored_keys, stored_values, group_idx, groups, tail_keys, tail_values, "torch",
                  rotation=(key_rot, value_rot))
    got, _ = subtok_attention(None, query, kv, kv, None)  # [B, Q, Hq, D]
    back = PackedKV(
        rotate_groups(stored_keys.dequantize(torch.float32), key_rot),
        rotate_groups(stored_values.dequantize(torch.float32), value_rot),
        group_idx, groups, tail_keys, tail_values, "torch",
    )
    expected = packed_attention_reference.packed_attention(query, back)  # [B, Hq, Q, D]
    torch.testing.assert_close(got, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_rotated_storage_lowers_the_two_bit_error_in_the_model():
    model = make_tiny_model("llama", **_WIDE)
    ids = random_prompts(1, 80)
    with torch.no_grad():
        exact = model(ids).logits[:, -1]
    errors = {}
    for rotate in (False, True):
        # packed from the first token (an 80-token context is under the default floor)
        config = SubTokenConfig(num_groups=2, keep_groups=2, window=0, bits=2, rotate=rotate, floor_tokens=0)
        cache = SubTokenCache(model, config)
        with torch.no_grad():
            model(ids[:, :-1], past_key_values=cache)
            logits = model(ids[:, -1:], past_key_values=cache).logits[:, -1]
        assert cache.layers[0]._view(cache.layers[0].window_keys, cache.layers[0].window_values).rotation is (
            None if not rotate else cache.layers[0]._rotation()
        )
        errors[rotate] = ((logits - exact).norm() / exact.norm()).item()
    assert errors[True] < errors[False]


def test_rotate_needs_bits_and_powers_of_two():
    with pytest.raises(ValueError, match="rotate=True needs bits="):
        SubTokenConfig(rotate=True)
    with pytest.raises(ValueError, match="rotate must be True or False"):
        SubTokenConfig(bits=4, rotate=1)
    config = SubTokenConfig(bits=4, num_groups=3, keep_groups=3, rotate=True, quant_group_size=16)
    with pytest.raises(ValueError, match="rotate=True needs value group width=16 to be a power of two|head_dim=48"):
        config.storage_format(48, 4)


def test_generation_is_the_same_through_the_triton_kernel():
    pytest.importorskip("triton")
    from tests.kernel_cases import DEVICE

    model = make_tiny_model("llama", **_WIDE).to(DEVICE)
    ids = random_prompts(1, 40).to(DEVICE)
    config = SubTokenConfig(num_groups=2, keep_groups=2, window=8, bits=4, rotate=True, floor_tokens=0)
    outs = greedy_per_backend(model, config, ids, 12)
    assert torch.equal(outs["torch"], outs["triton"])
