"""Keys quantized per channel over blocks of tokens (KIVI's layout), movable token by token.

Key channels differ in range by orders of magnitude (a few outlier channels, RoPE pairs
turning at different speeds), while within one channel neighbouring tokens are alike. A
scale and zero per (channel, block of `block_size` tokens) therefore fits keys far better
than a scale per (token, group of channels): measured on SmolLM2-135M-Instruct
(`benchmarks/key_quantization_error.py`: the last 256 queries of a 2k text attending over its
first 1792 keys), the relative error of the attention output is 0.200 per channel against
0.353 per token at 2 bits, 0.034 against 0.042 at 4 bits, for the same bytes of scales; with
the attention sink (first token) in a block of its own, 0.137 and 0.020. In the cache, with
every token kept in 2 bits, 11 of 12 withheld-question needles are found with keys per
channel, 3 of 12 per token (BENCHMARKS.md, "Keys per channel").

A cache evicts and re-selects tokens one at a time, so each token carries the index of its
block (`int16`); the block tables stay where they are when tokens move. `take` and
`slice_tokens` compact the tables afterwards, so a block no token refers to any more is
dropped (each row keeps as many table rows as its fullest neighbour needs).

Tokens packed while decoding (`pack_chunk` at a time) form blocks of that size, whose tables
cost more per token than the prompt's full blocks; the cache counts them (budget checks use
the rows really held). Coding such tokens against an earlier block instead does not work:
measured on SmolLM2-135M-Instruct (2-bit keys, 64 decode steps after a 1k prompt), in every
one of the 240 (layer, chunk) packs some head had a token outside every earlier block's
range on some channel (RoPE's slow channels keep drifting to values no earlier block saw).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hf_subtok.quant.bits import check_bits, pack_bits, unpack_bits
from hf_subtok.quant.reference import default_scale_dtype, fit_grid
from hf_subtok.quant.tensor import SCALE_DTYPES, PackedCodes
from hf_subtok.rows import take_rows

BLOCK_INDEX_DTYPE = torch.int16
MAX_BLOCKS = torch.iinfo(BLOCK_INDEX_DTYPE).max + 1


@dataclass(frozen=True)
class ChannelQuantizedTensor(PackedCodes):
    """A logical `[..., T, N]` float tensor in `bits` bits with a scale and zero per channel
    and block of tokens: `x[..., t, n] ~= code[..., t, n] * scale[..., block[..., t], n]
    + zero[..., block[..., t], n]`.

    Attributes:
        payload: `[..., T, N * bits / 8]` uint8, codes packed along the last dim.
        block: `[..., T]` int16, the table row of each token's scales.
        scale: `[..., NB, N]` float16, bfloat16 or float32.
        zero: `[..., NB, N]`, same dtype as `scale`.
        bits: 2, 4 or 8.
        block_size: tokens quantized together (a block may hold fewer after eviction).
    """

    payload: torch.Tensor
    block: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    block_size: int

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` unless the components fit together."""
        check_bits(self.bits)
        if self.payload.dtype != torch.uint8 or self.block.dtype != BLOCK_INDEX_DTYPE:
            raise ValueError(
                f"payload must be uint8 and block {BLOCK_INDEX_DTYPE}, got {self.payload.dtype} and {self.block.dtype}"
            )
        if self.scale.dtype not in SCALE_DTYPES or self.zero.dtype != self.scale.dtype:
            raise ValueError(
                f"scale and zero must share a dtype in {SCALE_DTYPES}, got {self.scale.dtype} and {self.zero.dtype}"
            )
        lead = self.payload.shape[:-2]
        channels = self.payload.shape[-1] * 8 // self.bits if self.payload.dim() >= 2 else -1
        if (
            self.payload.dim() < 2
            or self.block.shape != self.payload.shape[:-1]
            or self.scale.shape != self.zero.shape
            or self.scale.shape[:-2] != lead
            or self.scale.shape[-1] != channels
        ):
            raise ValueError(
                f"payload [..., T, N*bits/8], block [..., T] and scale, zero [..., NB, N] do not fit: "
                f"{tuple(self.payload.shape)}, {tuple(self.block.shape)}, {tuple(self.scale.shape)}, "
                f"{tuple(self.zero.shape)} at bits={self.bits}"
            )

    def token_scales(self, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 scale and zero `[..., t, N]` of tokens `start:end`."""
        return self.rows_by_block(self.scale.float(), start, end), self.rows_by_block(self.zero.float(), start, end)

    def rows_by_block(self, table: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Row `block[..., t]` of a `[..., NB, X]` per-block `table` for tokens `start:end`:
        `[..., t, X]`.

        Whole rows (`take_rows`): measured on a CPU (1 thread, 1024 tokens x 3 heads, 512
        blocks of 64 channels), 0.04 ms against 0.3 ms for an elementwise `gather`.
        """
        return take_rows(table, self.block[..., start:end], dim=-2)  # [..., t, X]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The `[..., T, N]` tensor in `dtype` (computed in float32, then rounded once)."""
        codes = unpack_bits(self.payload, self.bits).float()  # [..., T, N]
        scale, zero = self.token_scales()
        return codes.mul_(scale).add_(zero).to(dtype)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ChannelQuantizedTensor:
        """`fn` on every component; `fn` may only act on the dims before the token dim
        (batch reorder, device moves), which all components share."""
        return ChannelQuantizedTensor(
            fn(self.payload), fn(self.block), fn(self.scale), fn(self.zero), self.bits, self.block_size
        )

    @staticmethod
    def cat(tensors: Sequence[ChannelQuantizedTensor]) -> ChannelQuantizedTensor:
        """Concatenate along the token dim; each part's blocks get table rows of their own."""
        first = tensors[0]
        for i, other in enumerate(tensors):
            if not isinstance(other, ChannelQuantizedTensor):
                raise TypeError(
                    f"tensors[{i}] must be a ChannelQuantizedTensor, got {type(other).__name__}"
                )
            if other.bits != first.bits:
                raise ValueError(f"tensors[{i}] has bits={other.bits}, tensors[0] bits={first.bits}")
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += t.scale.shape[-2]
        _check_block_count(total)
        return ChannelQuantizedTensor(
            torch.cat([t.payload for t in tensors], dim=-2),
            torch.cat([t.block + offset for t, offset in zip(tensors, offsets, strict=True)], dim=-1),
            torch.cat([t.scale for t in tensors], dim=-2),
            torch.cat([t.zero for t in tensors], dim=-2),
            first.bits,
            first.block_size,
        )

    def take(self, index: torch.Tensor) -> ChannelQuantizedTensor:
        """The tokens `index` (`[..., t]` int64 into the token dim, per leading row), tables
        compacted."""
        payload = take_rows(self.payload, index, dim=-2)
        block = torch.take_along_dim(self.block, index, dim=-1)
        return _compact(payload, block, self.scale, self.zero, self.bits, self.block_size)

    def slice_tokens(self, stop: int) -> ChannelQuantizedTensor:
        """The first `stop` tokens, tables compacted."""
        return _compact(
            self.payload[..., :stop, :].clone(),
            self.block[..., :stop].clone(),
            self.scale,
            self.zero,
            self.bits,
            self.block_size,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored components by name, for memory accounting."""
        return {"payload": self.payload, "block": self.block, "scale": self.scale, "zero": self.zero}


def quantize_channels(
    x: torch.Tensor,
    bits: int,
    block_size: int,
    scale_dtype: torch.dtype | None = None,
    solo: int = 0,
    clip: bool = False,
) -> ChannelQuantizedTensor:
    """Quantize `x` `[..., T, N]` per channel over blocks of `block_size` consecutive tokens
    (the last block may be shorter), asymmetric, with directed rounding of scale and zero as
    in `quant.reference.quantize`: every element comes back within half a stored step (with
    `clip`, every element inside its block's clipped range).

    Args:
        x: `[..., T, N]` float32, float16 or bfloat16, e.g. keys `[B, Hkv, T, D]`.
        bits: 2, 4 or 8; `N * bits` must be a multiple of 8.
        block_size: tokens sharing one scale and zero per channel.
        scale_dtype: dtype of scale and zero; default float16 (bfloat16 for bfloat16 `x`).
        solo: the first `solo` tokens get a block each (then kept within half a step of a
            near-zero scale, i.e. to the rounding of the scale dtype): attention sinks, whose
            keys are unlike the others' and take most of the attention, would otherwise widen
            their block's ranges for every neighbour (measured: relative error of the
            attention output 0.034 -> 0.020 at 4 bits, 0.200 -> 0.137 at 2 bits with the
            first token alone, `benchmarks/key_quantization_error.py`).
        clip: each (channel, block) over the range of least squared round-trip error among
            shrinks of its min/max range (`quant.reference.fit_grid`), its outliers clamped to
            the range's ends, instead of the min/max range.
    """
    if solo:
        if isinstance(solo, bool) or not isinstance(solo, int) or solo < 0:
            raise ValueError(f"solo must be a non-negative int, got {solo!r}")
        head = min(solo, x.shape[-2])
        return ChannelQuantizedTensor.cat(
            [
                quantize_channels(x[..., :head, :], bits, 1, scale_dtype),
                quantize_channels(x[..., head:, :], bits, block_size, scale_dtype, clip=clip),
            ]
        )
    check_bits(bits)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(
            f"x must be a floating point tensor [..., T, N], got {getattr(x, 'shape', type(x).__name__)}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    *lead, tokens, channels = x.shape
    if channels == 0 or channels * bits % 8:
        raise ValueError(
            f"the last dim ({channels}) at bits={bits} must be a positive multiple of {8 // bits}"
        )
    scale_dtype = default_scale_dtype(x.dtype) if scale_dtype is None else scale_dtype
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
    blocks = -(-tokens // block_size)
    _check_block_count(blocks)
    levels = (1 << bits) - 1
    source = x.float()
    full = tokens // block_size * block_size
    tables = [  # the full blocks, then the shorter last one: each (channel, block) a row
        fit_grid(part.reshape(*lead, -1, size, channels).transpose(-1, -2), levels, scale_dtype, clip)
        for part, size in ((source[..., :full, :], block_size), (source[..., full:, :], tokens - full))
        if part.shape[-2]
    ]  # [([..., nb, N], [..., nb, N]), ...]
    if not tables:  # no tokens: empty tables
        tables = [(torch.empty(*lead, 0, channels, dtype=scale_dtype, device=x.device),) * 2]
    zero = torch.cat([z for z, _ in tables], dim=-2)  # [..., NB, N]
    scale = torch.cat([s for _, s in tables], dim=-2)
    block = torch.arange(tokens, device=x.device) // block_size  # [T]
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = (source - zero.float()[..., block, :]).div_(divisor[..., block, :]).round_().clamp_(0, levels)
    codes = codes.to(torch.uint8)  # [..., T, N]
    block = block.to(BLOCK_INDEX_DTYPE).expand(*lead, tokens).contiguous()  # [..., T]
    return ChannelQuantizedTensor(
        pack_bits(codes.contiguous(), bits), block, scale, zero, bits, block_size
    )


def _compact(
    payload: torch.Tensor,
    block: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    block_size: int,
) -> ChannelQuantizedTensor:
    """Drop table rows no token refers to; rows keep their order (`[..., NB', N]`, NB' the
    most any leading row still uses)."""
    blocks = scale.shape[-2]
    used = torch.zeros(*block.shape[:-1], blocks, dtype=torch.bool, device=block.device)
    used.scatter_(-1, block.long(), True)  # [..., NB]
    live = int(used.sum(-1).max()) if used.numel() else 0
    if live == blocks:
        return ChannelQuantizedTensor(payload, block, scale, zero, bits, block_size)
    order = torch.argsort((~used).to(torch.uint8), dim=-1, stable=True)[..., :live]  # [..., NB']
    renumber = used.cumsum(-1).sub_(1)  # [..., NB]: old row -> new row
    new_block = renumber.gather(-1, block.long()).to(BLOCK_INDEX_DTYPE)
    return ChannelQuantizedTensor(
        payload, new_block, take_rows(scale, order, -2), take_rows(zero, order, -2), bits, block_size
    )


def _check_block_count(blocks: int) -> None:
    if blocks > MAX_BLOCKS:
        raise ValueError(
            f"{blocks} blocks of key scales exceed the {MAX_BLOCKS} an int16 block index can name; "
            "use a larger quant_block"
        )
