"""Attention over rank-projected tokens (`hf_subtok.kernels.rank_attention`, PyTorch reference)
against SDPA over dense keys and values built explicitly from the truncated projections."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_subtok.kernels import rank_attention, rank_attention_lse
from hf_subtok.kernels import rank_attention_reference as reference
from hf_subtok.rank.projection import project_tokens, reconstruct_tokens
from tests.kernel_cases import DTYPES, TOLERANCE
from tests.rank_cases import RankShape, make_rank, random_bases, sdpa, truncated

SHAPES = [
    RankShape(stored=37, tail=5, head_dim=64, group=3, key_width=16, value_width=32),
    RankShape(stored=20, tail=0, head_dim=32, group=1, key_width=32, value_width=8),  # no tail
    RankShape(stored=0, tail=6, head_dim=32, group=2, key_width=8, value_width=8),  # nothing stored
    RankShape(stored=9, tail=3, head_dim=48, group=5, key_width=13, value_width=48, batch=1, kv_heads=3),
]


def _run(query, kv, **kwargs):
    return rank_attention(query, kv, backend="torch", **kwargs)


@pytest.mark.parametrize("means", [True, False], ids=["centred", "uncentred"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_full_rank_equals_dense_attention(dtype, means):
    shape = RankShape(stored=40, tail=4, head_dim=32, group=2, key_width=32, value_width=32)
    query, kv, keys, values = make_rank(shape, dtype, seed=1, means=means, full=True)
    got = _run(query, kv)
    assert got.dtype == dtype and got.shape == query.shape
    torch.testing.assert_close(got.float(), sdpa(query, keys, values), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_rank_cut_equals_attention_over_truncated_tokens(shape, dtype):
    query, kv, keys, values = make_rank(shape, dtype, seed=2)
    torch.testing.assert_close(_run(query, kv).float(), sdpa(query, keys, values), **TOLERANCE[dtype])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_coefficients(bits):
    shape = RankShape(stored=30, tail=3, head_dim=32, group=2, key_width=16, value_width=24)
    query, kv, keys, values = make_rank(shape, torch.float32, seed=3, bits=bits)
    torch.testing.assert_close(_run(query, kv), sdpa(query, keys, values), **TOLERANCE[torch.float32])


def test_coefficients_past_the_rank_are_ignored():
    shape = RankShape(stored=25, tail=2, head_dim=32, group=2, key_width=16, value_width=16)
    query, kv, _, _ = make_rank(shape, torch.float32, seed=4)
    past = torch.arange(16) >= kv.key_rank.long().unsqueeze(-1)  # [B, Hkv, Ts, Rk]
    noisy = dataclasses.replace(
        kv, key_coeffs=kv.key_coeffs.masked_fill(past, 1e3), value_coeffs=kv.value_coeffs.masked_fill(past, -7.0),
        value_rank=kv.key_rank,
    )
    clean = dataclasses.replace(kv, value_rank=kv.key_rank)
    torch.testing.assert_close(_run(query, noisy), _run(query, clean))


def test_blocks_of_tokens_and_prefill_queries(monkeypatch):
    """Several blocks of stored tokens, and Q > 1 queries (causal over the tail, as prefill chunks)."""
    monkeypatch.setattr(reference, "BLOCK_TOKENS", 7)
    shape = RankShape(stored=30, tail=4, head_dim=32, group=2, key_width=16, value_width=16)
    _, kv, keys, values = make_rank(shape, torch.float32, seed=5)
    query = torch.randn(2, 4, 4, 32, generator=torch.Generator().manual_seed(5))
    causal = torch.ones(4, 34, dtype=torch.bool).tril(30)  # query i sees the stored tokens and tail 0..i
    torch.testing.assert_close(_run(query, kv), sdpa(query, keys, values, mask=causal), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_padding_mask_and_lse(kind):
    shape = RankShape(stored=20, tail=4, head_dim=32, group=2, key_width=8, value_width=8, batch=3)
    query, kv, keys, values = make_rank(shape, torch.float32, seed=6)
    attend = torch.arange(24).view(1, 24) >= 3 * torch.arange(3).view(3, 1)  # row b skips its first 3b
    mask = attend.view(3, 1, 1, 24)
    if kind == "additive":
        mask = torch.zeros(3, 1, 1, 24).masked_fill(~mask, torch.finfo(torch.float32).min)
    want = sdpa(query, keys, values, mask=attend.view(3, 1, 1, 24))
    torch.testing.assert_close(_run(query, kv, attention_mask=mask), want, **TOLERANCE[torch.float32])
    out, lse = rank_attention_lse(query, kv, mask, scaling=0.2, backend="torch")
    group = query.shape[1] // keys.shape[1]
    scores = (query.float() @ keys.repeat_interleave(group, 1).transpose(-1, -2) * 0.2).masked_fill(
        ~attend.view(3, 1, 1, 24), float("-inf")
    )
    torch.testing.assert_close(lse, scores.logsumexp(-1), **TOLERANCE[torch.float32])
    torch.testing.assert_close(out, sdpa(query, keys, values, mask=attend.view(3, 1, 1, 24), scale=0.2), **TOLERANCE[torch.float32])


def test_mass_sums_to_one_per_query_head():
    shape = RankShape(stored=15, tail=3, head_dim=32, group=3, key_width=8, value_width=8)
    query, kv, keys, _ = make_rank(shape, torch.float32, seed=7)
    _, mass = _run(query, kv, return_mass=True)
    assert mass.shape == (2, 2, 18)
    scores = query @ keys.repeat_interleave(3, 1).transpose(-1, -2) / 32**0.5  # [B, Hq, 1, T]
    want = scores.softmax(-1).view(2, 2, 3, 18).mean(2)
    torch.testing.assert_close(mass, want, **TOLERANCE[torch.float32])


def test_project_and_reconstruct_round_trip():
    generator = torch.Generator().manual_seed(8)
    bases = random_bases(2, 16, generator)
    keys, values = torch.randn(2, 2, 9, 16, generator=generator), torch.randn(2, 2, 9, 16, generator=generator)
    rank = torch.randint(0, 17, (2, 2, 9), generator=generator)
    key_c, value_c = project_tokens(keys, values, bases, rank)
    assert key_c.shape == (2, 2, 9, int(rank.max()))
    rebuilt = reconstruct_tokens(key_c, bases.key_basis, bases.key_mean, rank)
    torch.testing.assert_close(rebuilt.double(), truncated(keys, bases.key_basis, bases.key_mean, rank), atol=1e-5, rtol=1e-5)
    full_k, _ = project_tokens(keys, values, bases, 16)
    torch.testing.assert_close(reconstruct_tokens(full_k, bases.key_basis, bases.key_mean, 16), keys, atol=1e-5, rtol=1e-5)
    assert bases.nbytes() == 4 * (2 * 2 * 16 * 16 + 2 * 2 * 16)
    assert bases.nbytes(torch.bfloat16, key_width=4, value_width=8) == 2 * (2 * 16 * 12 + 2 * 2 * 16)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda kv: dataclasses.replace(kv, key_rank=kv.key_rank.float()), "kv.key_rank must be an integer tensor"),
        (lambda kv: dataclasses.replace(kv, value_basis=kv.value_basis[..., :3]), r"kv.value_basis must be a float \[Hkv=2, D=32, R=8\]"),
        (lambda kv: dataclasses.replace(kv, key_mean=kv.key_mean[:1]), r"kv.key_mean must be None or a float \[Hkv=2, D=32\]"),
        (lambda kv: dataclasses.replace(kv, value_coeffs=kv.value_coeffs[:, :, :3]), "kv.value_coeffs must be"),
        (lambda kv: dataclasses.replace(kv, tail_values=kv.tail_values.double()), "kv.tail_values dtype must match"),
    ],
    ids=["float-rank", "basis-width", "mean-heads", "token-count", "tail-dtype"],
)
def test_bad_inputs_name_the_field(change, match):
    shape = RankShape(stored=6, tail=2, head_dim=32, group=2, key_width=8, value_width=8)
    query, kv, _, _ = make_rank(shape, torch.float32)
    with pytest.raises(ValueError, match=match):
        rank_attention(query, change(kv), backend="torch")
    with pytest.raises(TypeError, match="kv must be a RankKV"):
        rank_attention(query, object())
