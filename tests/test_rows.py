"""`take_rows` gathers whole rows exactly as `torch.take_along_dim` broadcast over the rest."""

import pytest
import torch

from hf_subtok.quant.gather import take_rows

CASES = {
    # name: (shape of x, dim, index count, dtype)
    "keys [B,Hkv,T,D] fp32": ((2, 3, 37, 64), 2, 20, torch.float32),
    "values [B,Hkv,K,T,C] bf16": ((1, 3, 4, 29, 8), 3, 29, torch.bfloat16),
    "payload uint8, repeats": ((2, 2, 33, 16), 2, 50, torch.uint8),
    "scores [B,Hkv,T] (no rest)": ((2, 3, 40), 2, 7, torch.float32),
    "scales [..., T, ngroups] negative dim": ((1, 3, 2, 17, 2), -2, 5, torch.float16),
    "no index": ((1, 3, 12, 4), 2, 0, torch.float32),
    "no tokens, no index": ((1, 3, 0, 4), 2, 0, torch.float32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_take_rows_equals_take_along_dim(name):
    shape, dim, count, dtype = CASES[name]
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 50).to(dtype)
    axis = dim % len(shape)
    index = torch.randint(0, max(shape[axis], 1), (*shape[:axis], count), generator=generator)
    expected = torch.take_along_dim(x, index.view(*index.shape, *([1] * (len(shape) - axis - 1))), dim=axis)
    assert torch.equal(take_rows(x, index, dim), expected)


def test_take_rows_broadcasts_leading_dims_of_the_index_and_reads_any_strides():
    x = torch.arange(2 * 3 * 10 * 4, dtype=torch.float32).view(2, 3, 10, 4)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    index = torch.tensor([[[9, 0, 4]]])  # [1, 1, 3]: the same tokens for every row
    expected = torch.take_along_dim(x, index.expand(2, 3, 3).unsqueeze(-1), dim=2)
    assert torch.equal(take_rows(strided, index, 2), expected)
    assert torch.equal(take_rows(x, index.to(torch.int16), 2), expected)


def test_take_rows_refuses_an_index_of_the_wrong_rank_or_a_dim_out_of_range():
    with pytest.raises(ValueError, match="index must have 3 dims"):
        take_rows(torch.zeros(1, 3, 10, 4), torch.zeros(3, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"dim must be in \[-4, 4\)"):
        take_rows(torch.zeros(1, 3, 10, 4), torch.zeros(1, 3, 10, 2, dtype=torch.long), 6)
