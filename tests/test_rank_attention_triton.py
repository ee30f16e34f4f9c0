"""Triton decode attention over rank-projected tokens against the PyTorch reference.

Runs under Triton's interpreter on a CPU (the root conftest sets `TRITON_INTERPRET=1`) and
compiled on a GPU. `torch.empty` is NaN-filled so reads of unwritten memory fail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_subtok.kernels import rank_attention, rank_attention_lse
from hf_subtok.kernels.rank_attention_reference import rank_attention as reference
from hf_subtok.kernels.rank_attention_reference import rank_attention_lse as reference_lse
from tests.kernel_cases import DEVICE, DTYPES, TOLERANCE
from tests.rank_cases import RankShape, make_rank, sdpa

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("nan_empty")

SHAPES = [
    RankShape(stored=70, tail=9, head_dim=64, group=3, key_width=16, value_width=32),
    RankShape(stored=33, tail=0, head_dim=64, group=8, key_width=64, value_width=64, batch=1),  # full width, no tail
    RankShape(stored=0, tail=5, head_dim=32, group=1, key_width=8, value_width=8),  # nothing stored
    RankShape(stored=65, tail=2, head_dim=96, group=2, key_width=24, value_width=40, batch=1, kv_heads=3),  # D not 2^n
    RankShape(stored=40, tail=3, head_dim=128, group=5, key_width=20, value_width=100, batch=1, kv_heads=1),
]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_decode_matches_reference(shape, dtype):
    query, kv, _, _ = make_rank(shape, dtype)
    got = rank_attention(query, kv)
    assert got.dtype == dtype and got.shape == query.shape
    torch.testing.assert_close(got.float(), reference(query, kv).float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("means", [True, False], ids=["centred", "uncentred"])
def test_full_rank_equals_dense_attention(means):
    shape = RankShape(stored=50, tail=4, head_dim=32, group=2, key_width=32, value_width=32)
    query, kv, keys, values = make_rank(shape, torch.float32, seed=1, means=means, full=True)
    torch.testing.assert_close(rank_attention(query, kv), sdpa(query, keys, values), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_coefficients(bits):
    shape = RankShape(stored=45, tail=3, head_dim=64, group=2, key_width=16, value_width=24)
    query, kv, _, _ = make_rank(shape, torch.float32, seed=3, bits=bits)
    torch.testing.assert_close(rank_attention(query, kv), reference(query, kv), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("mask_kind", ["none", "padding", "per_head"])
def test_masks_mass_and_lse(mask_kind):
    shape = RankShape(stored=40, tail=5, head_dim=32, group=3, key_width=12, value_width=12, batch=3)
    query, kv, _, _ = make_rank(shape, torch.float32, seed=4)
    mask = None
    if mask_kind == "padding":
        attend = torch.arange(45, device=DEVICE).view(1, 45) >= 3 * torch.arange(3, device=DEVICE).view(3, 1)
        mask = attend.view(3, 1, 1, 45)
    elif mask_kind == "per_head":
        valid = torch.rand(3, 2, 40, generator=torch.Generator().manual_seed(4)) > 0.3
        valid[1, 0] = False  # a head with no valid stored token
        kv = dataclasses.replace(kv, stored_valid=valid.to(DEVICE))
        mask = torch.ones(3, 1, 1, 7, dtype=torch.bool, device=DEVICE)
        mask[0, ..., -2] = False  # a tail column
    out, mass = rank_attention(query, kv, mask, return_mass=True)
    want_out, want_mass = reference(query, kv, mask, return_mass=True)
    torch.testing.assert_close(out, want_out, **TOLERANCE[torch.float32])
    torch.testing.assert_close(mass, want_mass, **TOLERANCE[torch.float32])
    got_out, got_lse = rank_attention_lse(query, kv, mask, scaling=0.3)
    ref_out, ref_lse, _ = reference_lse(query, kv, mask, scaling=0.3)
    torch.testing.assert_close(got_out, ref_out, **TOLERANCE[torch.float32])
    torch.testing.assert_close(got_lse, ref_lse, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("split_tokens", [32, 64], ids=lambda n: f"split{n}")
def test_token_splits_merge_exactly(split_tokens):
    from hf_subtok.kernels.rank_attention_triton import rank_decode_attention_triton

    shape = RankShape(stored=100, tail=7, head_dim=64, group=2, key_width=16, value_width=16)
    query, kv, _, _ = make_rank(shape, torch.float32, seed=5)
    out, lse = rank_decode_attention_triton(query, kv, split_tokens=split_tokens, out_dtype=torch.float32)
    ref_out, ref_lse, _ = reference_lse(query, kv)
    torch.testing.assert_close(out, ref_out, **TOLERANCE[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **TOLERANCE[torch.float32])
