"""Keys quantized per channel over blocks of tokens (`quant.channel`): round trips within half a
step, tokens moved by gather, cat and cut with their blocks, tables compacted, errors."""

from __future__ import annotations

import pytest
import torch

from hf_subtok.quant import ChannelQuantizedTensor, extend_channels, quantize, quantize_channels
from hf_subtok.quant.channel import MAX_BLOCKS, rows_by_block
from tests.kernel_cases import DEVICE, DTYPES, assert_within_half_a_step

BITS = [8, 4, 2]

# (keys shape [B, Hkv, T, D], block_size)
CASES = {
    "B2-Hkv3-T37-D64-blk16": ((2, 3, 37, 64), 16),
    "B1-Hkv2-T64-D128-blk32": ((1, 2, 64, 128), 32),
    "B1-Hkv1-T5-D64-blk32": ((1, 1, 5, 64), 32),
    "single-token-D64": ((1, 1, 1, 64), 32),
    "zero-tokens-D64": ((1, 2, 0, 64), 32),
    "B1-Hkv1-T9-D8-blk1": ((1, 1, 9, 8), 1),
}


def _keys(shape, dtype, seed=0):
    """Channels of very different ranges and offsets (as keys have), tokens alike within one."""
    generator = torch.Generator().manual_seed(seed)
    channel_scale = torch.rand(shape[-1], generator=generator).mul(5).exp()
    offset = torch.randn(shape[-1], generator=generator) * 3
    x = torch.randn(*shape, generator=generator) * channel_scale + offset
    return x.to(dtype=dtype, device=DEVICE)


def _check_bound(x: torch.Tensor, q: ChannelQuantizedTensor, dtype: torch.dtype):
    """|x - dequantize(x)| <= scale / 2 of the token's block."""
    scale, zero = q.token_scales()  # [..., T, N]
    assert_within_half_a_step(x, q, scale, zero, dtype)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_round_trip_within_half_a_step(case, dtype, bits):
    shape, block_size = CASES[case]
    x = _keys(shape, dtype)
    q = quantize_channels(x, bits, block_size)
    blocks = -(-shape[-2] // block_size)
    assert q.scale.shape == (*shape[:-2], blocks, shape[-1])
    assert q.payload.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert q.shape == x.shape
    assert q.run_block.shape == (*shape[:-2], blocks) and q.run_length.dtype == torch.int32  # one run per block
    assert (q.run_length.sum(-1) == shape[-2]).all()
    _check_bound(x, q, dtype)


def test_scales_are_per_channel_and_block():
    """A channel's scale spans only its block's tokens: a huge value in block 1 leaves block 0's
    scale (and its precision) alone, and other channels' scales too."""
    x = torch.zeros(1, 1, 64, 8)
    x[..., :32, :] = torch.linspace(0, 1, 32).view(32, 1)
    x[..., 32:, :] = torch.linspace(0, 1, 32).view(32, 1)
    x[0, 0, 40, 3] = 1000.0
    q = quantize_channels(x, 4, 32)
    scale = q.scale.float()[0, 0]  # [NB, N]
    assert scale[1, 3] > 60 and scale[0, 3] < 0.1 and scale[1, 2] < 0.1
    assert (q.dequantize(torch.float32)[..., :32, :] - x[..., :32, :]).abs().max() < 0.04


def test_per_channel_fits_keys_with_outlier_channels_better_than_per_token():
    """Why keys are stored per channel: at the same bytes of scales (a scale and zero per 32
    elements), channels of different ranges come back far closer than with scales per token."""
    generator = torch.Generator().manual_seed(0)
    channel_scale = torch.rand(64, generator=generator).mul(5).exp()
    offset = torch.randn(64, generator=generator) * channel_scale * 2  # keys sit off zero per channel
    x = torch.randn(1, 2, 256, 64, generator=generator) * channel_scale + offset  # [B, Hkv, T, D]
    per_channel = quantize_channels(x, 2, 32).dequantize(torch.float32)
    per_token = quantize(x, 2, 32).dequantize(torch.float32)
    assert (per_channel - x).norm() < 0.5 * (per_token - x).norm()


def test_take_moves_tokens_with_their_blocks_and_drops_unused_tables():
    x = _keys((2, 3, 100, 64), torch.float32)
    q = quantize_channels(x, 4, 32)  # blocks 0..3 (the last holds 4 tokens)
    exact = q.dequantize(torch.float32)
    generator = torch.Generator().manual_seed(1)
    # row-dependent picks, none from block 1 in any row, out of order
    index = torch.stack(
        [torch.cat([torch.randperm(32, generator=generator)[:5], 64 + torch.randperm(36, generator=generator)[:7]])
         for _ in range(6)]
    ).view(2, 3, 12)
    taken = q.take(index)
    assert taken.scale.shape == (2, 3, 3, 64)  # block 1 dropped from every row
    expected = exact.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, 64))
    torch.testing.assert_close(taken.dequantize(torch.float32), expected, rtol=0, atol=0)


def test_take_keeps_as_many_table_rows_as_the_fullest_row_needs():
    q = quantize_channels(_keys((1, 2, 96, 8), torch.float32), 8, 32)  # 3 blocks
    index = torch.tensor([[[0, 40, 80], [1, 2, 3]]])  # row 0 uses 3 blocks, row 1 one
    taken = q.take(index)
    assert taken.scale.shape == (1, 2, 3, 8)
    assert taken.token_blocks()[0, 1].tolist() == [0, 0, 0]
    assert taken.run_length[0, 1].tolist() == [3, 0, 0]  # one run, padded to row 0's three
    expected = q.dequantize(torch.float32).gather(2, index.unsqueeze(-1).expand(-1, -1, -1, 8))
    torch.testing.assert_close(taken.dequantize(torch.float32), expected, rtol=0, atol=0)


def test_cat_gives_each_part_its_own_blocks():
    a = quantize_channels(_keys((1, 2, 40, 16), torch.float32, seed=1), 2, 32)
    b = quantize_channels(_keys((1, 2, 8, 16), torch.float32, seed=2) * 50, 2, 32)
    joined = ChannelQuantizedTensor.cat([a, b])
    assert joined.scale.shape == (1, 2, 3, 16)
    assert joined.token_blocks()[0, 0, -8:].tolist() == [2] * 8
    assert joined.run_length[0, 0].tolist() == [32, 8, 8]
    expected = torch.cat([a.dequantize(torch.float32), b.dequantize(torch.float32)], dim=2)
    torch.testing.assert_close(joined.dequantize(torch.float32), expected, rtol=0, atol=0)


def test_first_tokens_keeps_the_first_tokens_and_their_tables_only():
    q = quantize_channels(_keys((1, 1, 70, 16), torch.float32), 4, 32)
    cut = q.first_tokens(20)
    assert cut.scale.shape == (1, 1, 1, 16) and cut.shape == (1, 1, 20, 16)
    torch.testing.assert_close(cut.dequantize(torch.float32), q.dequantize(torch.float32)[..., :20, :])


def test_apply_acts_on_the_batch_of_every_component():
    q = quantize_channels(_keys((3, 2, 40, 16), torch.float32), 4, 32)
    picked = q.apply(lambda t: t.index_select(0, torch.tensor([2, 0])))
    expected = q.dequantize(torch.float32).index_select(0, torch.tensor([2, 0]))
    torch.testing.assert_close(picked.dequantize(torch.float32), expected, rtol=0, atol=0)


def test_bad_arguments_raise_value_errors():
    x = torch.randn(1, 1, 10, 64)
    with pytest.raises(ValueError, match="bits"):
        quantize_channels(x, 3, 32)
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        quantize_channels(x, 4, 0)
    with pytest.raises(ValueError, match=r"x must be a floating point tensor \[..., T, N\]"):
        quantize_channels(torch.ones(1, 10, 64, dtype=torch.int32), 4, 32)
    with pytest.raises(ValueError, match="the last dim \\(3\\) at bits=4"):
        quantize_channels(torch.randn(1, 1, 10, 3), 4, 32)
    with pytest.raises(ValueError, match="int16 block index"):
        quantize_channels(torch.randn(1, 1, MAX_BLOCKS + 1, 8), 8, 1)
    q = quantize_channels(x, 4, 32)
    with pytest.raises(ValueError, match="do not fit"):
        ChannelQuantizedTensor(q.payload, q.run_block[..., :0], q.run_length, q.scale, q.zero, 4, 32)
    with pytest.raises(ValueError, match="run_block torch.int16 and run_length torch.int32"):
        ChannelQuantizedTensor(q.payload, q.run_block.int(), q.run_length, q.scale, q.zero, 4, 32)


def test_rows_by_block_is_each_tokens_own_table_row():
    """`rows_by_block` equals an elementwise gather by block index, for every (batch, head) row,
    with tokens out of block order (as after eviction) and a token range."""
    generator = torch.Generator().manual_seed(3)
    q = quantize_channels(_keys((2, 3, 40, 16), torch.float32), 4, 8)  # 5 blocks per row
    order = torch.rand(2, 3, 40, generator=generator).argsort(-1)
    moved = q.take(order.to(DEVICE))
    table = torch.randn(*moved.scale.shape[:-1], 3, generator=generator).to(DEVICE)  # [B, Hkv, NB, 3]
    block = moved.token_blocks()
    want = table.gather(-2, block.unsqueeze(-1).expand(-1, -1, -1, 3))  # [B, Hkv, T, 3]
    torch.testing.assert_close(rows_by_block(table, block), want, rtol=0, atol=0)
    torch.testing.assert_close(rows_by_block(table, block[..., 7:29]), want[..., 7:29, :], rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_runs_name_every_tokens_block_in_any_order(seed):
    """Tokens taken in any order (repeats too) keep their blocks: the runs expand to the
    gathered per-token blocks, sum to the token count per row, and ascending takes keep one run
    per block; every table row left is used."""
    generator = torch.Generator().manual_seed(seed)
    q = quantize_channels(_keys((2, 3, 50, 8), torch.float32, seed=seed), 2, 8, solo=2)
    blocks = q.token_blocks()
    for ascending in (True, False):
        index = torch.randint(0, 50, (2, 3, 30), generator=generator)
        index = index.sort(-1).values if ascending else index
        taken = q.take(index.to(DEVICE))
        assert (taken.run_length.sum(-1) == 30).all()
        old_rows = taken.token_blocks()  # new rows; map back through the tables' values
        torch.testing.assert_close(
            rows_by_block(taken.scale, old_rows), rows_by_block(q.scale, blocks.gather(-1, index)), rtol=0, atol=0
        )
        if ascending:
            distinct = [len(set(row.tolist())) for row in blocks.gather(-1, index).flatten(0, 1)]
            assert taken.run_length.shape[-1] == max(distinct) and taken.scale.shape[-2] == max(distinct)


def test_runs_cost_a_fraction_of_a_byte_per_token():
    """Tokens that never moved hold one run (6 bytes) per block, not an index per token."""
    q = quantize_channels(_keys((1, 2, 1024, 64), torch.float32), 2, 64, solo=1)
    run_bytes = q.run_block.nbytes + q.run_length.nbytes
    assert run_bytes == 2 * 17 * 6  # 2 rows x (1 sink + 16 blocks) x (int16 + int32)


def _block_errors(x: torch.Tensor, q: ChannelQuantizedTensor, block_size: int) -> torch.Tensor:
    """Squared round-trip error per (channel, block): `[..., NB, N]`."""
    miss = (q.dequantize(torch.float32) - x.float()).square()  # [..., T, N]
    block = torch.arange(x.shape[-2]) // block_size
    return torch.zeros_like(q.scale, dtype=torch.float32).index_add_(-2, block, miss)


@pytest.mark.parametrize("bits", [4, 2], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("case", ["B2-Hkv3-T37-D64-blk16", "B1-Hkv1-T5-D64-blk32"])
def test_clipped_ranges_never_err_more_per_channel_and_block(case, bits):
    """Each (channel, block), the last shorter one included, errs no more with `clip` than over
    its min/max range, and strictly less somewhere on heavy-tailed keys."""
    shape, block_size = CASES[case]
    generator = torch.Generator().manual_seed(3)
    x = _keys(shape, torch.float32) + torch.empty(shape).cauchy_(generator=generator)
    plain = _block_errors(x, quantize_channels(x, bits, block_size), block_size)
    clipped = _block_errors(x, quantize_channels(x, bits, block_size, clip=True), block_size)
    assert (clipped <= plain * (1 + 1e-5) + 1e-6).all()
    assert (clipped < plain * 0.99).any()


def test_clipping_clamps_a_blocks_outliers_and_keeps_the_rest_within_half_a_step():
    """Two outliers in a block of a channel: the clipped range (shrunk around its middle)
    leaves them out (they come back at the range's ends) and spends the levels on the other
    tokens, which come back within half of the finer step; the channel's other block and the
    other channels get the ranges they get without the outliers."""
    x = torch.linspace(-1, 1, 64).view(1, 1, 64, 1).repeat(1, 1, 1, 4)
    x[0, 0, 5, 2], x[0, 0, 6, 2] = 4.0, -4.0
    plain = quantize_channels(x, 2, 32)
    clipped = quantize_channels(x, 2, 32, clip=True)
    assert clipped.scale[0, 0, 0, 2] <= plain.scale[0, 0, 0, 2] * 0.6
    scale, zero = clipped.token_scales()
    got = clipped.dequantize(torch.float32)
    assert torch.isclose(got[0, 0, 5, 2], (zero + 3 * scale)[0, 0, 5, 2])  # the range's ends
    assert torch.isclose(got[0, 0, 6, 2], zero[0, 0, 6, 2])
    inside = torch.ones_like(x, dtype=torch.bool)
    inside[0, 0, 5:7, 2] = False
    assert ((got - x).abs()[inside] <= (scale / 2 + 1e-6)[inside]).all()
    calm = quantize_channels(torch.linspace(-1, 1, 64).view(1, 1, 64, 1).repeat(1, 1, 1, 4), 2, 32, clip=True)
    assert torch.equal(clipped.scale[..., 1, :], calm.scale[..., 1, :])
    assert torch.equal(clipped.scale[..., 0, :2], calm.scale[..., 0, :2])


def test_clip_applies_after_the_solo_sink_tokens():
    """With `solo`, the sinks keep a block each and the rest are clipped as without them."""
    x = _keys((1, 2, 40, 16), torch.float32, seed=4)
    x[..., 10, 3] = 1e4
    q = quantize_channels(x, 2, 16, solo=2, clip=True)
    rest = quantize_channels(x[..., 2:, :], 2, 16, clip=True)
    assert torch.equal(q.scale[..., 2:, :], rest.scale) and torch.equal(q.zero[..., 2:, :], rest.zero)
    assert torch.equal(q.payload[..., 2:, :], rest.payload)


def _grown_token_by_token(x: torch.Tensor, bits: int, block_size: int, prompt: int, chunk: int, log_scale: bool):
    """`x` `[..., T, N]`: the first `prompt` tokens quantized (one sink), the rest added `chunk`
    at a time with `extend_channels`, tracking the open block as a cache does."""
    held = quantize_channels(x[..., :prompt, :], bits, block_size, solo=1, log_scale=log_scale)
    open_tokens = (prompt - 1) % block_size
    for start in range(prompt, x.shape[-2], chunk):
        part = x[..., start : start + chunk, :]
        held = extend_channels(held, part, open_tokens)
        open_tokens = (open_tokens + part.shape[-2]) % block_size
    return held


@pytest.mark.parametrize("log_scale", [False, True], ids=["fp16-scales", "log-scales"])
@pytest.mark.parametrize("bits", [4, 2], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("chunk", [1, 5, 40], ids=lambda c: f"chunk{c}")
def test_grown_blocks_hold_full_blocks_and_stay_close_to_quantizing_at_once(chunk, bits, log_scale):
    """Tokens added to the open block join it: the runs and tables are those of quantizing all
    tokens at once (full blocks, the last one partial). Every token stays inside its block's
    final grid's span (which covers it), blocks closed before growing are untouched, and re-coding on
    widened grids costs at most 3x the squared error of quantizing at once."""
    x = _keys((2, 3, 150, 16), torch.float32, seed=5)
    grown = _grown_token_by_token(x, bits, 32, prompt=50, chunk=chunk, log_scale=log_scale)
    at_once = quantize_channels(x, bits, 32, solo=1, log_scale=log_scale)
    assert torch.equal(grown.run_length, at_once.run_length) and torch.equal(grown.run_block, at_once.run_block)
    assert grown.scale.shape == at_once.scale.shape and grown.block_size == 32
    scale, _ = grown.token_scales()
    error = (grown.dequantize(torch.float32) - x).abs()
    slack = 1e-5 * x.abs().amax()
    assert (error <= ((1 << bits) - 1) * scale + slack).all()
    closed = grown.dequantize(torch.float32)[..., :33, :]  # the sink and the full block: untouched
    torch.testing.assert_close(closed, at_once.dequantize(torch.float32)[..., :33, :], rtol=0, atol=0)
    once = (at_once.dequantize(torch.float32) - x).square().sum()
    assert error.square().sum() <= 3 * once


def test_tokens_inside_the_open_blocks_grid_leave_its_table_and_codes_alone():
    x = _keys((1, 2, 40, 16), torch.float32, seed=6)
    held = quantize_channels(x[..., :20, :], 2, 32)  # one open block of 20
    inside = (x[..., 3:5, :] + x[..., 7:9, :]) / 2  # between tokens of the block, channel by channel
    grown = extend_channels(held, inside, 20)
    torch.testing.assert_close(grown.scale, held.scale, rtol=0, atol=0)
    torch.testing.assert_close(grown.zero, held.zero, rtol=0, atol=0)
    assert torch.equal(grown.payload[..., :20, :], held.payload)
    assert grown.run_length[0, 0].tolist() == [22]


def test_a_full_last_block_is_not_grown():
    x = _keys((1, 1, 70, 8), torch.float32, seed=7)
    held = quantize_channels(x[..., :64, :], 4, 32)
    grown = extend_channels(held, x[..., 64:, :], 0)
    assert grown.run_length[0, 0].tolist() == [32, 32, 6]
    torch.testing.assert_close(grown.dequantize(torch.float32), quantize_channels(x, 4, 32).dequantize(torch.float32))


@pytest.mark.parametrize("stop", [0, 1, 9, 17, 30])
def test_a_token_prefix_cuts_the_runs_and_reads_the_first_tokens(stop):
    """`token_prefix` (a view: tables shared) and `first_tokens` (compacted) read back the first
    `stop` tokens, also when tokens were taken out of order (a run per token in places)."""
    q = quantize_channels(_keys((2, 2, 40, 8), torch.float32, seed=8), 4, 8, solo=1)
    index = torch.tensor([0, 30, 31, 2, 3, 4, 20, 12, 13, 14, 15, 39, 38, 5, 6, 7, 8, 9, 10, 11, 1, 21, 22, 23, 24, 25, 26, 27, 28, 29])
    moved = q.take(index.expand(2, 2, -1).to(DEVICE))
    full = moved.dequantize(torch.float32)
    prefix = moved.token_prefix(stop)
    assert (prefix.run_length.sum(-1) == stop).all() and prefix.scale is moved.scale
    torch.testing.assert_close(prefix.dequantize(torch.float32), full[..., :stop, :], rtol=0, atol=0)
    cut = moved.first_tokens(stop)
    torch.testing.assert_close(cut.dequantize(torch.float32), full[..., :stop, :], rtol=0, atol=0)
    assert cut.scale.shape[-2] == len(set(moved.token_blocks()[0, 0, :stop].tolist()))
