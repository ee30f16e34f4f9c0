"""Shared builders for the kernel tests: random `PackedKV`s of awkward shapes, tolerances."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from hf_subtok.kernels.pack_reference import pack_value_groups
from hf_subtok.packed import PackedKV
from hf_subtok.quant import quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


@dataclass(frozen=True)
class Shape:
    """One attention case: packed tokens Ts, tail tokens Tt, head_dim D, R query heads per KV
    head, K of G groups kept."""

    stored: int
    tail: int
    head_dim: int
    group: int
    keep: int
    groups: int
    batch: int = 2
    kv_heads: int = 2

    @property
    def id(self) -> str:
        return (
            f"B{self.batch}-Hkv{self.kv_heads}-R{self.group}-Ts{self.stored}-Tt{self.tail}"
            f"-D{self.head_dim}-K{self.keep}of{self.groups}"
        )


def make_packed(shape: Shape, dtype: torch.dtype, seed: int = 0, device: str = DEVICE):
    """`(query [B, Hq, 1, D], kv, dense_keys [B, Hkv, T, D], dense_values [B, Hkv, T, D])`."""
    generator = torch.Generator().manual_seed(seed)
    b, h, d = shape.batch, shape.kv_heads, shape.head_dim
    total = shape.stored + shape.tail

    def randn(*size):
        return torch.randn(*size, generator=generator).to(dtype=dtype, device=device)

    keys, values = randn(b, h, total, d), randn(b, h, total, d)
    query = randn(b, h * shape.group, 1, d)
    scores = torch.rand(b, h, shape.stored, shape.groups, generator=generator).to(device)
    packed, idx = pack_value_groups(values[:, :, : shape.stored], scores, shape.keep)
    kv = PackedKV(
        keys[:, :, : shape.stored].contiguous(),
        packed,
        idx,
        shape.groups,
        keys[:, :, shape.stored :].contiguous(),
        values[:, :, shape.stored :].contiguous(),
        "triton",
    )
    return query, kv, keys, values


def quantize_packed(kv: PackedKV, key_bits: int | None, value_bits: int | None, key_group: int = 32):
    """`(quantized, dequantized)`: `kv` with its packed keys/values quantized (None: left plain;
    values per group of `min(C, 16)` channels), and the same `PackedKV` holding the quantized
    tensors dequantized to the query's dtype: attention over both must agree."""
    keys, values = kv.keys, kv.values
    if key_bits is not None:
        keys = quantize(kv.keys, key_bits, key_group)
    if value_bits is not None:
        values = quantize(kv.values, value_bits, min(kv.values.shape[-1], 16))
    quantized = dataclasses.replace(kv, keys=keys, values=values)
    dtype = kv.tail_keys.dtype
    dequantized = dataclasses.replace(
        kv,
        keys=keys.dequantize(dtype) if key_bits is not None else keys,
        values=values.dequantize(dtype) if value_bits is not None else values,
    )
    return quantized, dequantized


def assert_within_half_a_step(x: torch.Tensor, q, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype):
    """`|x - q.dequantize(dtype)| <= scale / 2` per element (`scale`, `zero` float32 per
    element, as `x`), plus float32 arithmetic and rounding to `dtype`."""
    levels = (1 << q.bits) - 1
    arithmetic = 4 * torch.finfo(torch.float32).eps * (zero.abs() + levels * scale)
    got = q.dequantize(dtype)
    assert got.dtype == dtype and got.shape == x.shape
    rounding = torch.finfo(dtype).eps / 2 * got.float().abs() if dtype != torch.float32 else 0
    error = (got.float() - x.float()).abs()
    assert (error <= scale / 2 + arithmetic + rounding).all(), float((error - scale / 2).max())
