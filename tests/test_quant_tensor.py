"""`QuantizedTensor` moves like a plain tensor along every dim but the last: each token carries
its own scales, so quantizing then moving tokens equals moving them then quantizing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_subtok.quant import QuantizedTensor, quantize
from tests.kernel_cases import DEVICE


def _keys(tokens, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, tokens, 64, generator=generator).to(
        dtype=dtype, device=DEVICE
    )  # [B, Hkv, T, D]


def _same(a: QuantizedTensor, b: QuantizedTensor) -> bool:
    return (a.bits, a.group_size) == (b.bits, b.group_size) and all(
        torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values(), strict=True)
    )


@pytest.mark.parametrize("bits", [8, 4, 2], ids=lambda b: f"int{b}")
def test_cat_along_tokens_equals_quantizing_the_cat(bits):
    a, b = _keys(5), _keys(8, seed=1)
    got = QuantizedTensor.cat([quantize(a, bits, 32), quantize(b, bits, 32)], dim=-2)
    assert got.shape == (2, 3, 13, 64)
    assert _same(got, quantize(torch.cat([a, b], dim=-2), bits, 32))


def test_cat_with_an_empty_part():
    a = _keys(6)
    got = QuantizedTensor.cat([quantize(_keys(0), 4, 32), quantize(a, 4, 32)], dim=2)
    assert _same(got, quantize(a, 4, 32))


MOVES = {
    "gather-tokens": lambda x: x.gather(2, torch.tensor([4, 0, 2], device=x.device).view(1, 1, 3, 1).expand(2, 3, 3, x.shape[-1])),
    "index-select-batch": lambda x: x.index_select(0, torch.tensor([1], device=x.device)),
    "slice-tokens": lambda x: x[:, :, 1:4],
    "select-head": lambda x: x[:, 1:2],
    "to-device": lambda x: x.to(DEVICE),
    "contiguous-permute-heads": lambda x: x.flip(1).contiguous(),
}  # fmt: skip


@pytest.mark.parametrize("move", MOVES, ids=list(MOVES))
def test_apply_commutes_with_quantize(move):
    x = _keys(5)
    fn = MOVES[move]
    assert _same(quantize(x, 4, 16).apply(fn), quantize(fn(x), 4, 16))


def test_apply_refuses_to_change_the_last_dim():
    q = quantize(_keys(3), 4, 16)
    with pytest.raises(ValueError, match=r"scale \(2, 3, 3, 4\) must be \[..., N/group_size\]"):
        q.apply(lambda x: x[..., :4])


def test_shape_and_accounting():
    q = quantize(_keys(7), 4, 32)
    assert q.shape == (2, 3, 7, 64) and q.ndim == q.dim() == 4 and q.device == torch.device(DEVICE)
    assert set(q.tensors()) == {"payload", "scale", "zero"}
    rows = 2 * 3 * 7
    assert (
        q.nbytes == rows * (64 * 4 // 8) + 2 * rows * (64 // 32) * 2
    )  # payload + fp16 scale and zero
    assert q.nbytes == sum(t.untyped_storage().nbytes() for t in q.tensors().values())


def test_nbytes_counts_the_whole_storage_of_a_view():
    """Accounting is from the storages: a token slice still holds its parent's bytes."""
    q = quantize(_keys(8), 8, 64)
    assert q.apply(lambda x: x[:, :, :2]).nbytes == q.nbytes


def test_frozen():
    q = quantize(_keys(1), 8, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.bits = 4
