"""Quantize/dequantize round trips within the error bound of the bit width, over dtypes and
awkward shapes: every element comes back within half a step of its group's stored scale."""

from __future__ import annotations

import pytest
import torch

from hf_subtok.quant import QuantizedTensor, quantize
from tests.kernel_cases import DEVICE, DTYPES, assert_within_half_a_step

BITS = [8, 4, 2]

# (logical shape, group_size): keys [B, Hkv, T, D], value groups [B, Hkv, K, T, C]
CASES = {
    "keys-B2-Hkv3-T37-D64-gs16": ((2, 3, 37, 64), 16),
    "keys-B1-Hkv2-T63-D128-gs32": ((1, 2, 63, 128), 32),
    "keys-B1-Hkv1-T5-D128-gs64": ((1, 1, 5, 128), 64),
    "keys-single-token-D64-gs64": ((1, 1, 1, 64), 64),
    "keys-zero-tokens-D64-gs32": ((1, 2, 0, 64), 32),
    "values-B2-Hkv2-K3-T17-C16-gs16": ((2, 2, 3, 17, 16), 16),
    "values-B1-Hkv1-K8-T9-C8-gs8": ((1, 1, 8, 9, 8), 8),
    "values-zero-tokens-C32-gs16": ((1, 2, 2, 0, 32), 16),
}


def _random(shape, dtype, seed=0):
    """Rows of very different magnitudes (as tokens of a cache are), with an outlier channel."""
    generator = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(*shape, generator=generator)
        * torch.rand(*shape[:-1], 1, generator=generator).mul(4).exp()
    )
    x[..., 0] *= 8
    return x.to(dtype=dtype, device=DEVICE)


def _per_element(part: torch.Tensor, group_size: int) -> torch.Tensor:
    return part.float().repeat_interleave(group_size, dim=-1)  # [..., N/gs] -> [..., N]


def _check_bound(x: torch.Tensor, q: QuantizedTensor, dtype: torch.dtype):
    """|x - dequantize(x)| <= scale / 2 of the element's group."""
    scale, zero = _per_element(q.scale, q.group_size), _per_element(q.zero, q.group_size)
    assert_within_half_a_step(x, q, scale, zero, dtype)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_round_trip_within_half_a_step(case, dtype, bits):
    shape, group_size = CASES[case]
    x = _random(shape, dtype)
    q = quantize(x, bits, group_size)
    assert q.shape == x.shape and q.payload.shape[-1] == shape[-1] * bits // 8
    assert q.scale.shape == q.zero.shape == (*shape[:-1], shape[-1] // group_size)
    assert q.scale.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    _check_bound(x, q, torch.float32)
    _check_bound(x, q, dtype)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_stored_scale_and_zero_cover_every_group(dtype, bits):
    """Directed rounding: zero <= min and zero + levels * scale >= max in the stored dtype, so
    no element is clamped and the extremes map to the first and last codes."""
    x = _random((3, 4, 33, 64), dtype, seed=1)
    q = quantize(x, bits, 16)
    groups = x.float().reshape(3, 4, 33, 4, 16)  # [B, Hkv, T, D/gs, gs]
    top = q.zero.float() + ((1 << bits) - 1) * q.scale.float()
    assert (q.zero.float() <= groups.amin(-1)).all() and (top >= groups.amax(-1) * (1 - 1e-6)).all()


@pytest.mark.parametrize(
    "scale_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
def test_any_scale_dtype_keeps_the_bound(scale_dtype):
    x = _random((2, 2, 19, 64), torch.float32, seed=2)
    q = quantize(x, 4, 32, scale_dtype=scale_dtype)
    assert q.scale.dtype == q.zero.dtype == scale_dtype
    _check_bound(x, q, torch.float32)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_constant_groups_are_exact(bits):
    x = torch.full((1, 2, 5, 64), 0.375, device=DEVICE)
    x[:, :, :, 32:] = -2.0
    q = quantize(x, bits, 32)
    assert torch.equal(q.dequantize(torch.float32), x)


def test_larger_groups_cost_fewer_bytes_and_more_error():
    """The trade the allocator makes: measured, not assumed."""
    x = _random((2, 2, 64, 128), torch.float32, seed=3)
    errors, sizes = [], []
    for group_size in (16, 32, 64, 128):
        q = quantize(x, 4, group_size)
        errors.append(float((q.dequantize(torch.float32) - x).pow(2).mean()))
        sizes.append(q.nbytes)
    assert sizes == sorted(sizes, reverse=True) and errors == sorted(errors)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fewer_bits_more_error(dtype):
    x = _random((2, 2, 40, 64), dtype, seed=4)
    errors = [
        float((quantize(x, bits, 32).dequantize(torch.float32) - x.float()).pow(2).mean())
        for bits in BITS
    ]
    assert errors == sorted(errors)
