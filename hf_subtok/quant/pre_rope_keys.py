"""Keys stored before RoPE, per channel: in their own channels or in calibrated bases (issue 22).

After RoPE a key's channel pairs turn at the speed of its position, so the range of a channel
over a block of tokens mixes the two channels of its pair; before RoPE each channel keeps its
own range. A stored key is `c = unrope(k, p)` (`[D]`, RoPE undone at its position p), or with
calibrated bases (`hf-subtok calibrate --key-space pre_rope`) `c = (unrope(k, p) - mean) @ B`,
B the head's `[D, D]` orthonormal basis; c is quantized per channel over blocks of tokens
(`quant.channel`), p held as runs (`quant.positions`). Attention rebuilds each block of keys,
`rope(c, p)` (or `rope(c @ B^T + mean, p)`: a `[D, D]` product per token and head) and scores
the query against them. RoPE and its inverse use the model's frequencies and attention factor
as transformers applies them (`scorers.token_base.RopeInfo`).

Measured in the cache on SmolLM2-135M-Instruct (2-bit keys and values, every token kept;
BENCHMARKS.md "Keys before RoPE"): own channels lose less than the Hadamard-rotated keys after
RoPE on legal text (+8.1% against +10.5% perplexity in float32, +8.1% against +13.3% in
bfloat16) and a little more on the book (+2.3% against +1.3%); the calibrated basis loses more
than both, although a simulation that compressed every key, recent ones included, had it
cutting the 2-bit loss to a third (`benchmarks/rank_at_equal_bits.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hf_subtok.quant.bits import unpack_bits
from hf_subtok.quant.channel import ChannelQuantizedTensor, rows_by_block
from hf_subtok.quant.logscale import scale_values
from hf_subtok.quant.positions import PositionRuns
from hf_subtok.quant.tensor import PackedCodes


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`(x1, x2) -> (-x2, x1)` over the two halves of the last dim (RoPE's pairing)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@dataclass(frozen=True)
class KeyBasis:
    """How one layer stores keys before RoPE: in a calibrated basis or in their own channels,
    and the model's rotary frequencies (what the layer holds for them, counted by it once:
    `tensors()`).

    Attributes:
        basis: `[Hkv, D, D]` orthonormal columns per KV head, or None (own channels).
        mean: `[Hkv, D]` the calibration mean coefficients are taken around, or None.
        inv_freq: `[D/2]` float32 RoPE frequencies: channel pairs `(i, i + D/2)` turn by
            `position * inv_freq[i]`.
        attention_scaling: the factor transformers multiplies cos and sin by.
    """

    basis: torch.Tensor | None
    mean: torch.Tensor | None
    inv_freq: torch.Tensor
    attention_scaling: float = 1.0

    def tensors(self) -> dict[str, torch.Tensor]:
        held = {"inv_freq": self.inv_freq}
        held.update({name: getattr(self, name) for name in ("basis", "mean") if getattr(self, name) is not None})
        return held

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 `(cos, sin)` `[B, Hkv, T, D]` at `positions` `[B, Hkv, T]`."""
        angles = positions.unsqueeze(-1).float() * self.inv_freq.float()  # [B, Hkv, T, D/2]
        angles = torch.cat([angles, angles], dim=-1)  # [B, Hkv, T, D]
        cos, sin = angles.cos(), angles.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos.mul_(self.attention_scaling), sin.mul_(self.attention_scaling)
        return cos, sin

    def coefficients(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """float32 `[B, Hkv, T, D]` coefficients of post-RoPE `keys` `[B, Hkv, T, D]` at
        `positions` `[B, Hkv, T]`: RoPE undone (divided by `cos^2 + sin^2`, the square of a
        scaled RoPE's attention factor), centred, projected."""
        cos, sin = self.cos_sin(positions)
        x = keys.float()
        before = (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)  # [B, Hkv, T, D]
        if self.mean is not None:
            before = before - self.mean.float().unsqueeze(1)
        return before if self.basis is None else before @ self.basis.float()  # [B, Hkv, T, D] @ [Hkv, D, D]

    def keys(self, coefficients: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """float32 post-RoPE keys `[B, Hkv, t, D]` of `coefficients` `[B, Hkv, t, D]` at
        `positions` `[B, Hkv, t]`."""
        before = coefficients.float()
        if self.basis is not None:
            before = before @ self.basis.float().transpose(-1, -2)  # [B, Hkv, t, D]
        if self.mean is not None:
            before = before + self.mean.float().unsqueeze(1)
        cos, sin = self.cos_sin(positions)
        return (before * cos).addcmul_(rotate_half(before), sin)


@dataclass(frozen=True)
class PreRopeKeys(PackedCodes):
    """Logical post-RoPE keys `[B, Hkv, T, D]` held as per-channel quantized pre-RoPE
    coefficients `coefficients` and their positions `positions`, in `basis` (shared: not one of
    `tensors()`, the layer counts it once)."""

    coefficients: ChannelQuantizedTensor
    positions: PositionRuns
    basis: KeyBasis

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` unless the coefficients are valid and the positions have their rows."""
        self.coefficients.validate()
        if self.positions.start.shape[:-1] != self.payload.shape[:-2]:
            raise ValueError(
                f"positions runs {tuple(self.positions.start.shape)} must have the rows of the coefficients "
                f"{tuple(self.payload.shape)}"
            )

    @property
    def payload(self) -> torch.Tensor:
        return self.coefficients.payload

    @property
    def bits(self) -> int:
        return self.coefficients.bits

    def tensors(self) -> dict[str, torch.Tensor]:
        held = {f"coefficients.{k}": v for k, v in self.coefficients.tensors().items()}
        held.update({f"positions.{k}": v for k, v in self.positions.tensors().items()})
        return held

    def token_positions(self) -> torch.Tensor:
        """`[B, Hkv, T]` int64 positions of the tokens held."""
        return self.positions.expand(self.shape[-2])

    def take(self, index: torch.Tensor) -> PreRopeKeys:
        return PreRopeKeys(self.coefficients.take(index), self.positions.take(index, self.shape[-2]), self.basis)

    def token_prefix(self, stop: int) -> PreRopeKeys:
        return PreRopeKeys(self.coefficients.token_prefix(stop), self.positions.token_prefix(stop), self.basis)

    def first_tokens(self, stop: int) -> PreRopeKeys:
        kept = PositionRuns.of(self.positions.token_prefix(stop).expand(stop))
        return PreRopeKeys(self.coefficients.first_tokens(stop), kept, self.basis)

    def flatten_heads(self) -> PreRopeKeys:
        raise ValueError("keys stored before RoPE keep a row per KV head: head_budgets='adaptive' is not supported")

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PreRopeKeys:
        """`fn` on every stored component (not the shared basis)."""
        return PreRopeKeys(self.coefficients.apply(fn), self.positions.apply(fn), self.basis)

    @staticmethod
    def cat(tensors: Sequence[PreRopeKeys]) -> PreRopeKeys:
        for i, other in enumerate(tensors):
            if not isinstance(other, PreRopeKeys):
                raise TypeError(f"tensors[{i}] must be PreRopeKeys, got {type(other).__name__}")
        coefficients = ChannelQuantizedTensor.cat([t.coefficients for t in tensors])
        positions = PositionRuns.cat([t.positions for t in tensors])
        return PreRopeKeys(coefficients, positions, tensors[-1].basis)

    def extended(self, coefficients: ChannelQuantizedTensor) -> PreRopeKeys:
        """These keys followed by the tokens that come next in position order (a layer that
        never evicts packs them so), `coefficients` the codes of all
        (`quant.channel.extend_channels`, which grows the open block)."""
        return PreRopeKeys(coefficients, self.positions.grown(coefficients.shape[-2] - self.shape[-2]), self.basis)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The post-RoPE keys `[B, Hkv, T, D]` in `dtype`."""
        coefficients = self.coefficients.dequantize(torch.float32)
        return self.basis.keys(coefficients, self.token_positions()).to(dtype)


def pre_rope_key_scores(query: torch.Tensor, keys: PreRopeKeys, block: int) -> torch.Tensor:
    """float32 `query @ keys^T` (`[B, Hkv, M, D]` x `[B, Hkv, T, D]` -> `[B, Hkv, M, T]`), the
    keys rebuilt `block` tokens at a time from their codes, scales and positions."""
    coded = keys.coefficients
    tokens = coded.shape[-2]
    q = query.float()
    out = q.new_empty(*q.shape[:-1], tokens)  # [B, Hkv, M, T]
    table_rows, positions = coded.token_blocks(), keys.token_positions()  # [B, Hkv, T] each
    scales, zeros = scale_values(coded.scale), coded.zero.float()  # [B, Hkv, NB, D]
    for start in range(0, tokens, block):
        end = min(start + block, tokens)
        rows = table_rows[..., start:end]  # [B, Hkv, t]
        codes = unpack_bits(coded.payload[..., start:end, :], coded.bits).float()  # [B, Hkv, t, D]
        coefficients = codes.mul_(rows_by_block(scales, rows)).add_(rows_by_block(zeros, rows))
        rebuilt = keys.basis.keys(coefficients, positions[..., start:end])  # [B, Hkv, t, D]
        out[..., start:end] = q @ rebuilt.transpose(-1, -2)
    return out
