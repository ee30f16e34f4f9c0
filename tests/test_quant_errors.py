"""Unsupported bit widths and group sizes, and components that do not fit together, raise
`ValueError` naming the field and the value."""

from __future__ import annotations

import pytest
import torch

from hf_subtok.quant import QuantizedTensor, pack_bits, quantize
from tests.kernel_cases import DEVICE

X = torch.randn(2, 3, 64, device=DEVICE)

BAD_QUANTIZE = {
    "bits-3": ((X, 3, 16), r"bits must be one of \(2, 4, 8\), got 3"),
    "bits-16": ((X, 16, 16), r"bits must be one of \(2, 4, 8\), got 16"),
    "bits-1": ((X, 1, 16), r"bits must be one of \(2, 4, 8\), got 1"),
    "bits-True": ((X, True, 16), r"bits must be one of \(2, 4, 8\), got True"),
    "group-not-dividing": ((X, 4, 24), r"group_size must be a positive int dividing the last dim \(64\), got 24"),
    "group-zero": ((X, 4, 0), r"group_size must be a positive int dividing the last dim \(64\), got 0"),
    "group-float": ((X, 4, 16.0), r"group_size must be a positive int dividing the last dim \(64\), got 16.0"),
    "packing-remainder-4bit": ((torch.randn(3, 5, device=DEVICE), 4, 5), r"the last dim \(5\) at bits=4 leaves 4 bits over a whole byte"),
    "packing-remainder-2bit": ((torch.randn(3, 6, device=DEVICE), 2, 3), r"the last dim \(6\) at bits=2 leaves 4 bits over a whole byte"),
    "integer-input": ((torch.ones(2, 8, dtype=torch.long, device=DEVICE), 8, 8), "x must be a floating point tensor, got torch.int64"),
    "empty-last-dim": ((torch.ones(2, 0, device=DEVICE), 8, 8), r"x must have a non-empty last dim, got shape \(2, 0\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_QUANTIZE, ids=list(BAD_QUANTIZE))
def test_quantize_rejects(case):
    args, message = BAD_QUANTIZE[case]
    with pytest.raises(ValueError, match=message):
        quantize(*args)


def test_quantize_rejects_scale_dtype():
    with pytest.raises(ValueError, match="scale_dtype must be one of .*got torch.int32"):
        quantize(X, 4, 16, scale_dtype=torch.int32)


GOOD = quantize(X, 4, 16)
PAYLOAD, SCALE, ZERO = GOOD.payload, GOOD.scale, GOOD.zero

BAD_TENSOR = {
    "bits-5": ((PAYLOAD, SCALE, ZERO, 5, 16), r"bits must be one of \(2, 4, 8\), got 5"),
    "group-negative": ((PAYLOAD, SCALE, ZERO, 4, -16), "group_size must be a positive int, got -16"),
    "payload-dtype": ((PAYLOAD.float(), SCALE, ZERO, 4, 16), "payload must be torch.uint8, got torch.float32"),
    "scale-int": ((PAYLOAD, SCALE.int(), ZERO.int(), 4, 16), "scale and zero must share a dtype .*got torch.int32 and torch.int32"),
    "zero-dtype": ((PAYLOAD, SCALE, ZERO.bfloat16(), 4, 16), "got torch.float16 and torch.bfloat16"),
    "zero-shape": ((PAYLOAD, SCALE, ZERO[..., :2], 4, 16), r"payload must be \[..., N\*bits/8\] and scale, zero"),
    "scale-groups": ((PAYLOAD, SCALE, ZERO, 4, 32), r"must be \[..., N/group_size\] = \(2, 3, 2\)"),
    "bits-mismatch": ((PAYLOAD, SCALE, ZERO, 8, 16), r"must be \[..., N/group_size\] = \(2, 3, 2\) for payload \(2, 3, 32\) at bits=8"),
    "scale-rows": ((PAYLOAD, SCALE[:1], ZERO[:1], 4, 16), r"scale \(1, 3, 4\) must be"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_TENSOR, ids=list(BAD_TENSOR))
def test_quantized_tensor_rejects(case):
    args, message = BAD_TENSOR[case]
    with pytest.raises(ValueError, match=message):
        QuantizedTensor(*args)


def test_quantized_tensor_rejects_non_tensors():
    with pytest.raises(TypeError, match="scale must be a torch.Tensor, got list"):
        QuantizedTensor(PAYLOAD, [1.0], ZERO, 4, 16)


def test_cat_rejects_the_last_dim_and_mixed_formats():
    with pytest.raises(ValueError, match="dim must be a leading dim of a 3-d tensor .*got -1"):
        QuantizedTensor.cat([GOOD, GOOD], dim=-1)
    with pytest.raises(ValueError, match="dim must be a leading dim of a 3-d tensor .*got 3"):
        QuantizedTensor.cat([GOOD, GOOD], dim=3)
    with pytest.raises(
        ValueError, match="tensors\\[1\\] has bits=8, group_size=16; tensors\\[0\\] has bits=4"
    ):
        QuantizedTensor.cat([GOOD, quantize(X, 8, 16)], dim=0)
    with pytest.raises(ValueError, match="non-empty"):
        QuantizedTensor.cat([], dim=0)
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a QuantizedTensor, got Tensor"):
        QuantizedTensor.cat([GOOD, X], dim=0)


def test_pack_bits_rejects():
    with pytest.raises(ValueError, match="codes must be torch.uint8, got torch.int64"):
        pack_bits(torch.zeros(4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"the last dim \(3\) of codes must be a multiple of 2"):
        pack_bits(torch.zeros(3, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\), got 6"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 6)
