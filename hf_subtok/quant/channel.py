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

A cache evicts and re-selects tokens, so a token's block does not follow from its place; but
each row's tokens keep their order (prompt blocks, then decode chunks; selection keeps the
survivors ascending), so consecutive tokens share a block. The block of each token is therefore
held as runs: `run_block[..., r]` (`int16`) is the table row of the `run_length[..., r]`
consecutive tokens of run r. Tokens that never moved cost one run per block (about 0.1 byte per
token at 64-token blocks) instead of a 2-byte index per token; any order is still exact, at a
run per token at worst. The per-token index is expanded only while attention reads the keys
(`token_blocks`). The block tables stay where they are when tokens move; `take` and
`first_tokens` compact the tables and runs afterwards, so a block no token refers to any more
is dropped (each row keeps as many table rows and runs as its fullest neighbour needs; the
others are padded with empty runs).

Tokens packed while decoding form blocks of `pack_chunk` tokens, counted as held. Coding them
against an earlier block does not work: on SmolLM2 (2-bit keys, 64 steps after a 1k prompt) every
one of 240 (layer, chunk) packs had a token outside every earlier block's range on some channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hf_subtok.quant.bits import check_bits, pack_bits, unpack_bits
from hf_subtok.quant.gather import take_rows
from hf_subtok.quant.logscale import LOG_SCALE_DTYPE, scale_values
from hf_subtok.quant.reference import default_scale_dtype, fit_grid
from hf_subtok.quant.tensor import SCALE_DTYPES, PackedCodes

BLOCK_INDEX_DTYPE = torch.int16
MAX_BLOCKS = torch.iinfo(BLOCK_INDEX_DTYPE).max + 1
RUN_LENGTH_DTYPE = torch.int32


@dataclass(frozen=True)
class ChannelQuantizedTensor(PackedCodes):
    """A logical `[..., T, N]` float tensor in `bits` bits with a scale and zero per channel
    and block of tokens: `x[..., t, n] ~= code[..., t, n] * scale[..., b(t), n]
    + zero[..., b(t), n]`, `b(t)` the block of token t (`token_blocks`).

    Attributes:
        payload: `[..., T, N * bits / 8]` uint8, codes packed along the last dim.
        run_block: `[..., R]` int16, the table row of each run of consecutive tokens.
        run_length: `[..., R]` int32, the tokens of each run (0: padding); each row's sum is T.
        scale: `[..., NB, N]`: the dtype of `zero`, or uint8 logarithms (`quant.logscale`).
        zero: `[..., NB, N]` float16, bfloat16 or float32.
        bits: 2, 4 or 8.
        block_size: tokens quantized together (a block may hold fewer after eviction).
    """

    payload: torch.Tensor
    run_block: torch.Tensor
    run_length: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    block_size: int

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` unless the components fit together (run lengths summing to T per
        row is not checked: that would wait on the device)."""
        check_bits(self.bits)
        if (
            self.payload.dtype != torch.uint8
            or self.run_block.dtype != BLOCK_INDEX_DTYPE
            or self.run_length.dtype != RUN_LENGTH_DTYPE
        ):
            raise ValueError(
                f"payload must be uint8, run_block {BLOCK_INDEX_DTYPE} and run_length {RUN_LENGTH_DTYPE}, "
                f"got {self.payload.dtype}, {self.run_block.dtype} and {self.run_length.dtype}"
            )
        if self.zero.dtype not in SCALE_DTYPES or self.scale.dtype not in (self.zero.dtype, LOG_SCALE_DTYPE):
            raise ValueError(
                f"zero must be one of {SCALE_DTYPES} and scale its dtype or {LOG_SCALE_DTYPE} (logarithms), "
                f"got {self.zero.dtype} and {self.scale.dtype}"
            )
        lead = self.payload.shape[:-2]
        channels = self.payload.shape[-1] * 8 // self.bits if self.payload.dim() >= 2 else -1
        if (
            self.payload.dim() < 2
            or self.run_block.shape != self.run_length.shape
            or self.run_block.shape[:-1] != lead
            or self.scale.shape != self.zero.shape
            or self.scale.shape[:-2] != lead
            or self.scale.shape[-1] != channels
        ):
            raise ValueError(
                f"payload [..., T, N*bits/8], run_block and run_length [..., R] and scale, zero [..., NB, N] "
                f"do not fit: {tuple(self.payload.shape)}, {tuple(self.run_block.shape)}, "
                f"{tuple(self.run_length.shape)}, {tuple(self.scale.shape)}, {tuple(self.zero.shape)} "
                f"at bits={self.bits}"
            )

    @classmethod
    def from_token_blocks(
        cls,
        payload: torch.Tensor,
        block: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int,
        block_size: int,
    ) -> ChannelQuantizedTensor:
        """The tensor whose token t is in table row `block[..., t]` (`[..., T]` integers, any
        order), its tables compacted."""
        run_block, run_length = _runs_of(block)
        return _compact(payload, run_block, run_length, scale, zero, bits, block_size)

    def token_blocks(self) -> torch.Tensor:
        """`[..., T]` int64: the table row of each token, expanded from the runs (a transient,
        for reading the keys; nothing holds it)."""
        lead, tokens = self.payload.shape[:-2], self.payload.shape[-2]
        expanded = self.run_block.long().flatten().repeat_interleave(
            self.run_length.flatten(), output_size=lead.numel() * tokens
        )
        return expanded.view(*lead, tokens)

    def token_scales(self, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 scale and zero `[..., t, N]` of tokens `start:end`."""
        block = self.token_blocks()[..., start:end]
        return rows_by_block(scale_values(self.scale), block), rows_by_block(self.zero.float(), block)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The `[..., T, N]` tensor in `dtype` (computed in float32, then rounded once)."""
        codes = unpack_bits(self.payload, self.bits).float()  # [..., T, N]
        scale, zero = self.token_scales()
        return codes.mul_(scale).add_(zero).to(dtype)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ChannelQuantizedTensor:
        """`fn` on every component; `fn` may only act on the dims before the token dim
        (batch reorder, device moves), which all components share."""
        return ChannelQuantizedTensor(
            fn(self.payload), fn(self.run_block), fn(self.run_length), fn(self.scale), fn(self.zero),
            self.bits, self.block_size,
        )

    @staticmethod
    def cat(tensors: Sequence[ChannelQuantizedTensor]) -> ChannelQuantizedTensor:
        """Concatenate along the token dim; each part's blocks get table rows of their own. The
        result's `block_size` is the last part's (the blocks new tokens join)."""
        first = tensors[0]
        for i, other in enumerate(tensors):
            if not isinstance(other, ChannelQuantizedTensor):
                raise TypeError(
                    f"tensors[{i}] must be a ChannelQuantizedTensor, got {type(other).__name__}"
                )
            if other.bits != first.bits:
                raise ValueError(f"tensors[{i}] has bits={other.bits}, tensors[0] bits={first.bits}")
        block_size = tensors[-1].block_size
        tensors = [t for t in tensors if t.shape[-2]] or [first]  # an empty part adds no runs
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += t.scale.shape[-2]
        _check_block_count(total)
        return ChannelQuantizedTensor(
            torch.cat([t.payload for t in tensors], dim=-2),
            torch.cat(
                [(t.run_block + offset).to(BLOCK_INDEX_DTYPE) for t, offset in zip(tensors, offsets, strict=True)],
                dim=-1,
            ),
            torch.cat([t.run_length for t in tensors], dim=-1),
            torch.cat([t.scale for t in tensors], dim=-2),
            torch.cat([t.zero for t in tensors], dim=-2),
            first.bits,
            block_size,
        )

    def take(self, index: torch.Tensor) -> ChannelQuantizedTensor:
        """The tokens `index` (`[..., t]` int64 into the token dim, per leading row), tables
        and runs compacted (ascending indices keep one run per block)."""
        payload = take_rows(self.payload, index, dim=-2)
        block = torch.take_along_dim(self.token_blocks(), index, dim=-1)  # [..., t]
        return ChannelQuantizedTensor.from_token_blocks(payload, block, self.scale, self.zero, self.bits, self.block_size)

    def token_prefix(self, stop: int) -> ChannelQuantizedTensor:
        """A view of the first `stop` tokens' codes; the runs cut at `stop`, the tables shared
        (not compacted)."""
        ends = self.run_length.cumsum(-1)  # [..., R]
        length = (self.run_length - (ends - stop).clamp_min(0)).clamp_min(0).to(RUN_LENGTH_DTYPE)
        return ChannelQuantizedTensor(
            self.payload[..., :stop, :], self.run_block, length, self.scale, self.zero, self.bits, self.block_size
        )

    def first_tokens(self, stop: int) -> ChannelQuantizedTensor:
        """The first `stop` tokens (a copy), tables and runs compacted."""
        cut = self.token_prefix(stop)
        return _compact(
            cut.payload.clone(), cut.run_block, cut.run_length, self.scale, self.zero, self.bits, self.block_size
        )

    def flatten_heads(self) -> ChannelQuantizedTensor:
        """Every head's tokens in one row (`[B, 1, H * T, bytes]`); each head keeps its block
        tables, renumbered after those of the heads before it."""
        batch, heads, runs = self.run_block.shape  # payload [B, H, T, bytes], tables [B, H, NB, N]
        tokens, blocks = self.shape[-2], self.scale.shape[-2]
        offset = (torch.arange(heads, device=self.run_block.device) * blocks).view(1, heads, 1)
        flat_runs = (self.run_block + offset).to(self.run_block.dtype).reshape(batch, 1, heads * runs)
        channels, width = self.scale.shape[-1], self.payload.shape[-1]
        return ChannelQuantizedTensor(
            self.payload.reshape(batch, 1, heads * tokens, width), flat_runs, self.run_length.reshape(batch, 1, heads * runs),
            self.scale.reshape(batch, 1, heads * blocks, channels), self.zero.reshape(batch, 1, heads * blocks, channels),
            self.bits, self.block_size,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored components by name, for memory accounting."""
        return {
            "payload": self.payload,
            "run_block": self.run_block,
            "run_length": self.run_length,
            "scale": self.scale,
            "zero": self.zero,
        }


def rows_by_block(table: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Row `block[..., t]` of a `[..., NB, X]` per-block `table`: `[..., t, X]`.

    Whole rows (`take_rows`): measured on a CPU (1 thread, 1024 tokens x 3 heads, 512 blocks
    of 64 channels), 0.04 ms against 0.3 ms for an elementwise `gather`.
    """
    return take_rows(table, block, dim=-2)  # [..., t, X]


def quantize_channels(
    x: torch.Tensor,
    bits: int,
    block_size: int,
    scale_dtype: torch.dtype | None = None,
    solo: int = 0,
    clip: bool = False,
    log_scale: bool = False,
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
        log_scale: scales as 8-bit logarithms (`quant.logscale`: one byte instead of two),
            each (channel, block) the code of least squared error next to its exact scale
            (`quant.reference.fit_grid`), zeros in `scale_dtype`.
    """
    if solo:
        if isinstance(solo, bool) or not isinstance(solo, int) or solo < 0:
            raise ValueError(f"solo must be a non-negative int, got {solo!r}")
        head = min(solo, x.shape[-2])
        return ChannelQuantizedTensor.cat(
            [
                quantize_channels(x[..., :head, :], bits, 1, scale_dtype, log_scale=log_scale),
                quantize_channels(x[..., head:, :], bits, block_size, scale_dtype, clip=clip, log_scale=log_scale),
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
        fit_grid(part.reshape(*lead, -1, size, channels).transpose(-1, -2), levels, scale_dtype, clip, log_scale)
        for part, size in ((source[..., :full, :], block_size), (source[..., full:, :], tokens - full))
        if part.shape[-2]
    ]  # [([..., nb, N], [..., nb, N]), ...]
    if not tables:  # no tokens: empty tables
        empty = torch.empty(*lead, 0, channels, dtype=scale_dtype, device=x.device)
        tables = [(empty, empty.to(LOG_SCALE_DTYPE) if log_scale else empty)]
    zero = torch.cat([z for z, _ in tables], dim=-2)  # [..., NB, N]
    scale = torch.cat([s for _, s in tables], dim=-2)
    block = torch.arange(tokens, device=x.device) // block_size  # [T]
    codes = _codes_on(source, zero[..., block, :], scale[..., block, :], levels)  # [..., T, N]
    run_length = torch.full((blocks,), block_size, dtype=RUN_LENGTH_DTYPE, device=x.device)
    run_length[-1:] = tokens - (blocks - 1) * block_size  # the last block may be shorter
    run_block = torch.arange(blocks, dtype=BLOCK_INDEX_DTYPE, device=x.device)
    return ChannelQuantizedTensor(
        pack_bits(codes.contiguous(), bits),
        run_block.expand(*lead, blocks).contiguous(),  # [..., NB]: one run per block
        run_length.expand(*lead, blocks).contiguous(),
        scale,
        zero,
        bits,
        block_size,
    )


def extend_channels(
    held: ChannelQuantizedTensor, x: torch.Tensor, open_tokens: int, clip: bool = False
) -> ChannelQuantizedTensor:
    """`held` followed by `x` `[..., t, N]` quantized per channel, the first of `x` joining
    `held`'s open last block: its last `open_tokens` tokens, which must be the last table row and
    the last run of every leading row (tokens packed in order, as a cache that never evicts
    packs them), with room for `block_size - open_tokens` more. The rest of `x` forms blocks of
    its own (`quantize_channels` with `clip`). Scales are stored as `held`'s are (8-bit
    logarithms or not).

    The open block keeps its grid on every channel whose range the new tokens stay inside;
    a channel they leave gets the grid `quantize_channels` would fit (`fit_grid`) to its old
    tokens as read back and the new ones, and its old tokens are re-coded on it. Measured on
    SmolLM2-135M-Instruct's keys at 2 bits (`benchmarks/key_block_growth.py`, BENCHMARKS.md
    "At 6% of the float32 bytes"), a 64-token block grown a token at a time errs about twice the
    squared error of quantizing its tokens at once; the alternative, tables of its own per
    decode chunk, costs 192-256 bytes of tables per token at `pack_chunk=1`.
    """
    levels = (1 << held.bits) - 1
    log_scale = held.scale.dtype == LOG_SCALE_DTYPE
    fill = min(x.shape[-2], held.block_size - open_tokens) if open_tokens > 0 else 0

    def own_blocks(part: torch.Tensor) -> ChannelQuantizedTensor:
        return quantize_channels(part, held.bits, held.block_size, held.zero.dtype, clip=clip, log_scale=log_scale)

    if fill <= 0:
        return ChannelQuantizedTensor.cat([held, own_blocks(x)])
    tokens = held.shape[-2]
    head, rest = x[..., :fill, :].float(), x[..., fill:, :]
    zero, scale = held.zero[..., -1:, :].float(), scale_values(held.scale[..., -1:, :])  # [..., 1, N]
    top = zero + levels * scale
    leaves = (head.amin(-2, keepdim=True) < zero) | (head.amax(-2, keepdim=True) > top)  # [..., 1, N]: grids to widen
    old = unpack_bits(held.payload[..., tokens - open_tokens :, :], held.bits).float() * scale + zero  # [..., o, N]
    both = torch.cat([old, head], dim=-2)  # [..., o + fill, N]
    refit = fit_grid(both.transpose(-1, -2).unsqueeze(-3), levels, held.zero.dtype, False, log_scale)  # [..., 1, N]
    new_zero = torch.where(leaves, refit[0], held.zero[..., -1:, :])
    new_scale = torch.where(leaves, refit[1], held.scale[..., -1:, :])
    codes = _codes_on(both, new_zero, new_scale, levels)  # [..., o + fill, N]
    run_length = held.run_length.clone()
    run_length[..., -1] += fill
    grown = ChannelQuantizedTensor(
        torch.cat([held.payload[..., : tokens - open_tokens, :], pack_bits(codes, held.bits)], dim=-2),
        held.run_block,
        run_length,
        torch.cat([held.scale[..., :-1, :], new_scale], dim=-2),
        torch.cat([held.zero[..., :-1, :], new_zero], dim=-2),
        held.bits,
        held.block_size,
    )
    if rest.shape[-2] == 0:
        return grown
    return ChannelQuantizedTensor.cat([grown, own_blocks(rest)])


def _codes_on(x: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    """uint8 codes of float32 `x` `[..., t, N]` on stored grids `zero`, `scale` (`[..., t, N]`,
    a row per token, or `[..., 1, N]`, one for all)."""
    step = scale_values(scale)
    divisor = torch.where(step == 0, torch.ones_like(step), step)
    return (x - zero.float()).div_(divisor).round_().clamp_(0, levels).to(torch.uint8)


def _runs_of(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of equal consecutive entries of `block` `[..., T]`: `(run_block, run_length)`
    `[..., R]`, R the most any leading row has (shorter rows padded with empty runs of block 0)."""
    *lead, tokens = block.shape
    if tokens == 0:
        return (
            block.new_zeros(*lead, 0, dtype=BLOCK_INDEX_DTYPE),
            block.new_zeros(*lead, 0, dtype=RUN_LENGTH_DTYPE),
        )
    starts = torch.ones_like(block, dtype=torch.bool)  # [..., T]: a token that opens a run
    starts[..., 1:] = block[..., 1:] != block[..., :-1]
    run = starts.cumsum(-1).sub_(1)  # [..., T]: each token's run
    runs = int(run[..., -1].max()) + 1
    run_length = torch.zeros(*lead, runs, dtype=RUN_LENGTH_DTYPE, device=block.device)
    run_length.scatter_add_(-1, run, torch.ones_like(run, dtype=RUN_LENGTH_DTYPE))
    run_block = torch.zeros(*lead, runs, dtype=BLOCK_INDEX_DTYPE, device=block.device)
    run_block.scatter_(-1, run, block.to(BLOCK_INDEX_DTYPE))
    return run_block, run_length


def _compact(
    payload: torch.Tensor,
    run_block: torch.Tensor,
    run_length: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    block_size: int,
) -> ChannelQuantizedTensor:
    """Drop table rows no token refers to and empty runs; rows keep their order (`[..., NB',
    N]`, NB' the most any leading row still uses; runs likewise)."""
    blocks = scale.shape[-2]
    filled = run_length > 0  # [..., R]
    used = torch.zeros(*run_block.shape[:-1], blocks + 1, dtype=torch.bool, device=run_block.device)
    used.scatter_(-1, torch.where(filled, run_block.long(), blocks), True)  # empty runs to a spare column
    used = used[..., :blocks]  # [..., NB]
    live = int(used.sum(-1).max()) if used.numel() else 0
    runs = int(filled.sum(-1).max()) if filled.numel() else 0
    if runs < run_block.shape[-1]:  # filled runs first, in order; empty ones after
        order = torch.argsort((~filled).to(torch.uint8), dim=-1, stable=True)[..., :runs]  # [..., R']
        run_block, run_length = run_block.gather(-1, order), run_length.gather(-1, order)
    if live == blocks:
        return ChannelQuantizedTensor(payload, run_block, run_length, scale, zero, bits, block_size)
    order = torch.argsort((~used).to(torch.uint8), dim=-1, stable=True)[..., :live]  # [..., NB']
    renumber = used.cumsum(-1).sub_(1).clamp_min_(0)  # [..., NB]: old row -> new row
    run_block = renumber.gather(-1, run_block.long()).to(BLOCK_INDEX_DTYPE)
    return ChannelQuantizedTensor(
        payload, run_block, run_length, take_rows(scale, order, -2), take_rows(zero, order, -2), bits, block_size
    )


def _check_block_count(blocks: int) -> None:
    if blocks > MAX_BLOCKS:
        raise ValueError(
            f"{blocks} blocks of key scales exceed the {MAX_BLOCKS} an int16 block index can name; "
            "use a larger quant_block"
        )
