"""Triton packing against the PyTorch reference: a pure copy, so results must be identical."""

from __future__ import annotations

import pytest
import torch

from hf_subtok.kernels import pack_value_groups
from hf_subtok.kernels.pack_reference import pack_value_groups as reference_pack
from tests.kernel_cases import DEVICE, DTYPES

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("nan_empty")

# (B, Hkv, T, D, G, K)
SHAPES = [
    (2, 2, 130, 64, 8, 3),
    (1, 3, 63, 128, 8, 1),
    (1, 1, 1, 128, 8, 8),
    (2, 1, 17, 64, 4, 4),
    (1, 2, 9, 96, 16, 9),  # D not a power of 2, C = 6
    (1, 1, 5, 64, 64, 63),  # C = 1
    (1, 1, 3, 16, 1, 1),  # one group
]


def _id(shape):
    b, h, t, d, g, k = shape
    return f"B{b}-Hkv{h}-T{t}-D{d}-K{k}of{g}"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=[_id(s) for s in SHAPES])
def test_pack_matches_reference(shape, dtype):
    b, h, t, d, g, k = shape
    generator = torch.Generator().manual_seed(t * g + k)
    values = torch.randn(b, h, t, d, generator=generator).to(dtype=dtype, device=DEVICE)
    scores = torch.randn(b, h, t, g, generator=generator).to(DEVICE)
    packed, idx = pack_value_groups(values, scores, k, backend="triton")
    want_packed, want_idx = reference_pack(values, scores, k)
    assert packed.dtype == dtype and idx.dtype == torch.uint8
    assert torch.equal(idx, want_idx)
    assert torch.equal(packed, want_packed)


def test_pack_strided_token_slice():
    """The cache packs `tail[..., :n, :]`, a view with the tail's strides."""
    tail = torch.randn(2, 2, 40, 64, device=DEVICE)
    scores = torch.rand(2, 2, 40, 8, device=DEVICE)[:, :, :24]
    values = tail[:, :, :24]
    assert not values.is_contiguous()
    got = pack_value_groups(values, scores, 3, backend="triton")
    want = reference_pack(values, scores, 3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_ties_keep_the_lower_groups():
    values = torch.randn(1, 1, 4, 32, device=DEVICE)
    scores = torch.ones(1, 1, 4, 8, device=DEVICE)
    _, idx = pack_value_groups(values, scores, 3, backend="triton")
    assert idx[0, 0, :, 0].tolist() == [0, 1, 2]


def test_empty_token_range():
    values = torch.randn(1, 2, 0, 64, device=DEVICE)
    packed, idx = pack_value_groups(values, torch.rand(1, 2, 0, 8, device=DEVICE), 3, backend="triton")
    assert packed.shape == (1, 2, 3, 0, 8) and idx.shape == (1, 2, 3, 0)


def test_unwritten_memory_reads_as_nan():
    """The `nan_empty` fixture is active here: memory a kernel leaves unwritten is poison."""
    assert torch.isnan(torch.empty(3)).all()
    assert (torch.empty(2, dtype=torch.uint8) == 255).all()
