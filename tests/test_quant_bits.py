"""Bit packing: exact inverse, the documented layout, and no read or write past its tensors
(inputs and outputs framed by poisoned guard regions; `torch.empty` is NaN-filled)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_subtok.quant import QuantizedTensor, pack_bits, quantize, unpack_bits
from tests.kernel_cases import DEVICE, DTYPES

pytestmark = pytest.mark.usefixtures("nan_empty")

BITS = [8, 4, 2]


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize(
    "shape", [(3, 5, 64), (1, 8), (2, 0, 16), (4,)], ids=["3x5x64", "1x8", "2x0x16", "4"]
)
def test_unpack_inverts_pack(shape, bits):
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, shape, generator=generator, dtype=torch.uint8).to(DEVICE)
    payload = pack_bits(codes, bits)
    assert payload.dtype == torch.uint8 and payload.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert torch.equal(unpack_bits(payload, bits), codes)


def test_layout_first_code_in_the_lowest_bits():
    codes = torch.tensor([1, 2, 3, 0, 2, 1, 0, 3], dtype=torch.uint8, device=DEVICE)
    assert pack_bits(codes, 4).tolist() == [1 | 2 << 4, 3 | 0 << 4, 2 | 1 << 4, 0 | 3 << 4]
    assert pack_bits(codes, 2).tolist() == [
        1 | 2 << 2 | 3 << 4 | 0 << 6,
        2 | 1 << 2 | 0 << 4 | 3 << 6,
    ]


def _framed(inner_shape, fill, dtype, pad=3):
    """A buffer poisoned with `fill` and the view of `inner_shape` in its middle (every dim padded)."""
    buffer = torch.full([n + 2 * pad for n in inner_shape], fill, dtype=dtype, device=DEVICE)
    view = buffer[tuple(slice(pad, pad + n) for n in inner_shape)]
    return buffer, view


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_quantize_reads_only_its_view(dtype, bits):
    """A strided view framed by NaN quantizes exactly like its contiguous copy."""
    buffer, x = _framed((2, 3, 7, 64), math.nan, dtype)
    x.copy_(torch.randn(2, 3, 7, 64, generator=torch.Generator().manual_seed(0)))
    guard = buffer.clone()
    got, want = quantize(x, bits, 32), quantize(x.contiguous(), bits, 32)
    for name, part in got.tensors().items():
        assert torch.equal(part, want.tensors()[name]), name
        assert not (part.is_floating_point() and part.isnan().any()), name
    assert torch.equal(buffer.isnan(), guard.isnan()), "quantize wrote into its input"


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_dequantize_reads_only_its_components(bits):
    """Payload framed by 0xFF and scale/zero framed by NaN: nothing of the frames leaks in."""
    q = quantize(torch.randn(2, 9, 64, device=DEVICE), bits, 16)
    framed = {}
    for name, part in q.tensors().items():
        _, view = _framed(part.shape, 255 if name == "payload" else math.nan, part.dtype)
        framed[name] = view.copy_(part)
    viewed = QuantizedTensor(framed["payload"], framed["scale"], framed["zero"], bits, 16)
    assert torch.equal(viewed.dequantize(torch.float32), q.dequantize(torch.float32))


@pytest.mark.parametrize("bits", [4, 2], ids=lambda b: f"int{b}")
def test_unpack_of_a_view_leaves_neighbours_alone(bits):
    """Packing and unpacking a column slice of a larger byte buffer touch only that slice."""
    buffer, view = _framed((5, 16), 0xA5, torch.uint8)
    view.copy_(
        torch.randint(
            0, 256, (5, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
        )
    )
    before = buffer.clone()
    codes = unpack_bits(view, bits)
    assert codes.shape == (5, 16 * 8 // bits) and int(codes.max()) < 1 << bits
    assert torch.equal(pack_bits(codes, bits), view)
    assert torch.equal(buffer, before)
