"""`benchmarks/keep_every_token_ceiling.py`: its layouts parse and count bytes as documented,
and its round trips are the quantizers it claims (least-squares 1-bit pairs, clipped key
ranges never worse than min/max), so the ceiling it reports is that of the layout named."""

from __future__ import annotations

import pytest
import torch

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("keep_every_token_ceiling")


def test_layout_parses_and_counts_bytes(script):
    layout = script.Layout.parse("k2b256c-v1g64-w2")
    assert (layout.key_bits, layout.key_block, layout.key_clip) == (2, 256, True)
    assert (layout.value_bits, layout.value_group, layout.window) == (1, 64, 2)
    # keys 16 B + tables 2*2*64/256 = 1 B; values 8 B + one scale and zero 4 B
    assert layout.packed_bytes(64) == pytest.approx(29.0)
    # 1022 packed tokens and 2 dense ones (512 B each) of 1024
    assert layout.ratio(64, 1024) == pytest.approx((1022 * 29.0 + 2 * 512) / (1024 * 512))
    exact = script.Layout.parse("k16b1-v16g64-w0")
    assert exact.ratio(64, 100) == pytest.approx(1.0)


@pytest.mark.parametrize("text", ["k2b256c-v1g64", "k3b256-v1g64-w0", "k2b0-v1g64-w0", "v1g64-w0"])
def test_layout_rejects_bad_text(script, text):
    with pytest.raises(ValueError, match="layout|bits|positive"):
        script.Layout.parse(text)


def test_one_bit_values_are_the_least_squares_pair(script):
    torch.manual_seed(0)
    values = torch.randn(1, 2, 5, 64)
    out = script.values_per_token(values, 1, 32)
    grouped, levels = values.reshape(1, 2, 5, 2, 32), out.reshape(1, 2, 5, 2, 32)
    for row, got in zip(grouped.reshape(-1, 32), levels.reshape(-1, 32), strict=True):
        high, low = got.max(), got.min()
        assert set(got.tolist()) == {high.item(), low.item()}
        upper = got == high
        # each level is the mean of the elements it stands for (a fixed point of Lloyd's steps)
        assert high.item() == pytest.approx(row[upper].mean().item(), abs=1e-5)
        assert low.item() == pytest.approx(row[~upper].mean().item(), abs=1e-5)
        # and its error is below the sign-times-mean-magnitude pair's
        sign = torch.where(row >= row.mean(), 1.0, -1.0) * (row - row.mean()).abs().mean() + row.mean()
        assert (got - row).square().sum() <= (sign - row).square().sum() + 1e-6


def test_clipped_keys_are_never_worse_than_min_max(script):
    torch.manual_seed(1)
    keys = torch.randn(1, 3, 300, 64)
    keys[..., 0, :] *= 20  # an outlier token sets every channel's min/max range
    plain = script.keys_per_channel(keys, 2, 128, clip=False)
    clipped = script.keys_per_channel(keys, 2, 128, clip=True)
    for start in range(0, 300, 128):
        block = slice(start, start + 128)
        plain_error = (plain[..., block, :] - keys[..., block, :]).square().sum(-2)
        clipped_error = (clipped[..., block, :] - keys[..., block, :]).square().sum(-2)
        assert bool((clipped_error <= plain_error + 1e-5).all())
    assert (clipped - keys).square().sum() < 0.8 * (plain - keys).square().sum()
    # at most four levels per channel and block
    assert all(clipped[0, 0, :128, c].unique().numel() <= 4 for c in range(64))


def test_round_trip_leaves_the_window_and_exact_parts_alone(script):
    torch.manual_seed(2)
    keys = [torch.randn(1, 2, 40, 64)]
    values = [torch.randn(1, 2, 40, 64)]
    out_keys, out_values = script.round_trip(keys, values, script.Layout.parse("k2b16c-v16g64-w8"))
    assert torch.equal(out_keys[0][..., 32:, :], keys[0][..., 32:, :])
    assert torch.equal(out_values[0], values[0])
    assert not torch.allclose(out_keys[0][..., :32, :], keys[0][..., :32, :], atol=1e-3)
    # still close: rotated 2-bit keys of unit-variance channels
    assert (out_keys[0][..., :32, :] - keys[0][..., :32, :]).square().mean() < 0.2


def test_rank_layout_counts_its_basis(script):
    layout = script.Layout.parse("k16b1-r32-w0")
    assert layout.value_rank == 32 and layout.value_bits == script.EXACT
    assert layout.packed_bytes(64) == pytest.approx(64 * 4 + 32 * 4)  # exact key, 32 coefficients
    basis = 64 * 33 * 4  # [D, r] basis and [D] mean in float32, once per head
    assert layout.ratio(64, 1000) == pytest.approx((1000 * (256 + 128) + basis) / (1000 * 512))
    with pytest.raises(ValueError, match="positive"):
        script.Layout.parse("k16b1-r0-w0")


def test_low_rank_keeps_the_top_directions(script):
    torch.manual_seed(3)
    values = torch.randn(1, 2, 50, 8) @ torch.randn(8, 8)
    assert torch.allclose(script.low_rank(values, 8), values, atol=1e-4)
    centred = values - values.mean(-2, keepdim=True)
    singular = torch.linalg.svdvals(centred)  # [1, 2, 8], descending
    error = (script.low_rank(values, 3) - values).square().sum((-1, -2))
    # the least squared error of a rank-3 fit is the dropped singular values' squares
    assert torch.allclose(error, singular[..., 3:].square().sum(-1), rtol=1e-4)


def test_vector_layout_counts_codes_scale_and_codebook(script):
    layout = script.Layout.parse("k2b256c-q4x32-w0")
    assert (layout.code_dim, layout.codes) == (4, 32)
    # keys 17 B; values: 16 pieces x 5 bits = 10 B and a float16 scale
    assert layout.packed_bytes(64) == pytest.approx(17 + 10 + 2)
    codebook = 32 * 4 * 2
    assert layout.ratio(64, 1000) == pytest.approx((1000 * 29 + codebook) / (1000 * 512))
    with pytest.raises(ValueError, match="codewords"):
        script.Layout.parse("k2b256c-q4x1-w0")
    with pytest.raises(ValueError, match="2..256 codewords"):
        script.Layout.parse("k2b256c-q4x512-w0")  # more words than the package's codes index


def test_vector_quantized_values_use_few_codewords(script):
    torch.manual_seed(4)
    values = torch.randn(1, 2, 64, 16) * torch.linspace(0.5, 3, 64).view(1, 1, 64, 1)
    out = script.vector_quantized(values, 4, 8)
    scale = values.square().mean(-1, keepdim=True).sqrt().half().float()  # as stored
    pieces = (out / scale).reshape(2, -1, 4)  # per head: every piece one of at most 8 codewords
    assert all(torch.unique(head.mul(1e3).round(), dim=0).shape[0] <= 8 for head in pieces)
    # far better than zero, worse than exact
    error = (out - values).square().sum() / values.square().sum()
    assert 0.05 < error < 0.7


def test_key_sinks_stay_exact_and_are_counted(script):
    layout = script.Layout.parse("k2b16cs4-v16g64-w0")
    assert layout.key_sinks == 4
    plain = script.Layout.parse("k2b16c-v16g64-w0")
    assert layout.ratio(64, 100) == pytest.approx(plain.ratio(64, 100) + 4 * 256 / (100 * 512))
    torch.manual_seed(6)
    keys, values = [torch.randn(1, 2, 40, 64)], [torch.randn(1, 2, 40, 64)]
    out_keys, _ = script.round_trip(keys, values, layout)
    assert torch.equal(out_keys[0][..., :4, :], keys[0][..., :4, :])
    assert not torch.allclose(out_keys[0][..., 4:, :], keys[0][..., 4:, :], atol=1e-3)
