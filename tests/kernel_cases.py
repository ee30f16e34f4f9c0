"""Shared builders for the kernel tests: random `PackedKV`s of awkward shapes, tolerances."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from hf_subtok.kernels.pack_reference import pack_value_groups, unpack_value_groups
from hf_subtok.quant import quantize
from hf_subtok.storage.wide import other_groups
from hf_subtok.views import PackedKV

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


def with_wide_tokens(shape: Shape, dtype: torch.dtype, wide: int, bits: int | None = None, seed: int = 0):
    """`(query, kv with its first `wide` packed tokens widened, dense [B, Hkv, T, D] keys and
    the values attention should see: every kept group, zeros for the groups not stored)`."""
    query, kv, keys, values = make_packed(shape, dtype, seed=seed)
    stored = shape.stored
    other, other_idx = other_groups(values[:, :, :wide], kv.group_idx[..., :wide], shape.groups)
    base, extra = kv.values, other
    if bits is not None:
        size = min(base.shape[-1], 16)
        base, extra = quantize(base, bits, size), quantize(other, bits, size)
        kv = dataclasses.replace(kv, values=base)
    kv = dataclasses.replace(kv, wide_values=extra, wide_group_idx=other_idx)
    as_stored = unpack_value_groups(
        base if bits is None else base.dequantize(dtype), kv.group_idx, shape.groups
    )  # [B, Hkv, Ts, D]
    extra_dense = unpack_value_groups(
        extra if bits is None else extra.dequantize(dtype), other_idx, shape.groups
    )
    as_stored[:, :, :wide] += extra_dense
    seen = torch.cat([as_stored, values[:, :, stored:]], dim=2)
    return query, kv, keys, seen


def shared_row(counts: list[int], bits: int | None = None, wide: int = 0, seed: int = 0, device: str = DEVICE):
    """A shared-row `PackedKV` on `device` holding `counts[h]` tokens of head h (K = 2 of 4
    groups, the first `wide` tokens of the row widened), the query `[1, Hq=2*Hkv, 1, D]`, and
    each head's `(keys [T_h, D], values [T_h, D] as attention sees them)`. The random numbers
    are drawn on the CPU, so every device gets the same inputs."""
    generator = torch.Generator().manual_seed(seed)
    heads, total, dim, groups = len(counts), sum(counts), 32, 4

    def rand(fn, *size):
        return fn(*size, generator=generator).to(device)

    keys = rand(torch.randn, 1, 1, total, dim)
    values = rand(torch.randn, 1, 1, total, dim)
    owner = torch.repeat_interleave(
        torch.arange(heads, device=device), torch.tensor(counts, device=device)
    ).view(1, 1, total)
    scores = rand(torch.rand, 1, 1, total, groups)
    packed, idx = pack_value_groups(values, scores, 2)  # [1, 1, 2, Ts, 8]
    seen = values.view(1, 1, total, groups, 8).clone()
    kept = torch.zeros(1, 1, total, groups, dtype=torch.bool, device=device).scatter_(
        3, idx.long().permute(0, 1, 3, 2), True
    )
    if wide:
        kept[:, :, :wide] = True
    seen = (seen * kept.unsqueeze(-1)).view(1, 1, total, dim)
    stored_keys = keys
    if bits is not None:
        stored_keys, packed = quantize(keys, bits, 16), quantize(packed, bits, 8)
        keys = stored_keys.dequantize(torch.float32)
        base = torch.zeros(1, 1, total, groups, 8, device=device)
        base.scatter_(3, idx.long().permute(0, 1, 3, 2).unsqueeze(-1).expand(-1, -1, -1, -1, 8),
                      packed.dequantize(torch.float32).permute(0, 1, 3, 2, 4))
        values_seen = base
    extra = {}
    if wide:
        other, other_idx = other_groups(values[:, :, :wide], idx[..., :wide], groups)
        other_stored = other if bits is None else quantize(other, bits, 8)
        extra = {"wide_values": other_stored, "wide_group_idx": other_idx}
        if bits is not None:
            values_seen[:, :, :wide].scatter_(
                3, other_idx.long().permute(0, 1, 3, 2).unsqueeze(-1).expand(-1, -1, -1, -1, 8),
                other_stored.dequantize(torch.float32).permute(0, 1, 3, 2, 4),
            )
    if bits is not None:
        seen = values_seen.view(1, 1, total, dim)
    valid = owner == torch.arange(heads, device=device).view(1, heads, 1)  # [1, Hkv, Ts]
    empty = torch.zeros(1, heads, 0, dim, device=device)  # [B, Hkv, Tt=0, D]
    kv = PackedKV(stored_keys, packed, idx, groups, empty, empty.clone(), "torch", stored_valid=valid, **extra)
    query = rand(torch.randn, 1, 2 * heads, 1, dim)
    per_head = [(keys[0, 0, valid[0, h]], seen[0, 0, valid[0, h]]) for h in range(heads)]
    return query, kv, per_head
