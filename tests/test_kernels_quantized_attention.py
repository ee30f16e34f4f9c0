"""Attention over quantized packed storage.

The PyTorch reference reads quantized keys/values a block of tokens at a time; it must equal
attention over the dequantized tensors (blocks lowered to 16 tokens so every case crosses
block boundaries). The Triton decode kernel (interpreted on a CPU) must equal the reference.
`torch.empty` is NaN-filled so reads of unwritten memory fail.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch

from hf_subtok.kernels import packed_attention, packed_attention_lse, packed_attention_reference
from hf_subtok.kernels.merge import packed_attention_lse_reference
from hf_subtok.quant import QuantizedTensor, unpack_bits
from hf_subtok.views import PackedKV
from tests.kernel_cases import DEVICE, DTYPES, TOLERANCE, Shape, make_packed, quantize_packed

pytestmark = pytest.mark.usefixtures("nan_empty")

SHAPES = [
    Shape(stored=130, tail=9, head_dim=64, group=3, keep=3, groups=8),
    Shape(stored=63, tail=0, head_dim=128, group=8, keep=1, groups=8),  # empty tail, K = 1
    Shape(stored=0, tail=5, head_dim=64, group=1, keep=4, groups=4),  # empty packed part
    Shape(stored=1, tail=1, head_dim=64, group=2, keep=4, groups=4, batch=1),  # every group kept
    Shape(stored=70, tail=64, head_dim=128, group=1, keep=8, groups=8, kv_heads=1),  # full window
    Shape(stored=33, tail=8, head_dim=64, group=5, keep=2, groups=4, kv_heads=3),
]
# (key bits, value bits), None: left plain
FORMATS = {
    "k8v8": (8, 8),
    "k4v4": (4, 4),
    "k2v2": (2, 2),
    "k4-plain-v": (4, None),
    "plain-k-v2": (None, 2),
}


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(packed_attention_reference, "BLOCK_TOKENS", 16)


def _selected_per_head(kv: PackedKV, seed: int) -> PackedKV:
    generator = torch.Generator().manual_seed(seed)
    batch, heads, stored = kv.keys.shape[:3]
    valid = (torch.rand(batch, heads, stored, generator=generator) > 0.3).to(DEVICE)
    return dataclasses.replace(kv, stored_valid=valid)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_reference_equals_attention_over_dequantized(shape, dtype, fmt):
    query, kv, _, _ = make_packed(shape, dtype)
    quantized, dequantized = quantize_packed(kv, *FORMATS[fmt])
    out, mass = packed_attention_reference.packed_attention(query, quantized, return_mass=True)
    want_out, want_mass = packed_attention_reference.packed_attention(
        query, dequantized, return_mass=True
    )
    assert out.dtype == dtype and mass.shape == (
        shape.batch,
        shape.kv_heads,
        shape.stored + shape.tail,
    )
    torch.testing.assert_close(out.float(), want_out.float(), **TOLERANCE[dtype])
    torch.testing.assert_close(mass, want_mass, **TOLERANCE[dtype])
    out, lse = packed_attention_lse_reference(query, quantized)
    want_out, want_lse = packed_attention_lse_reference(query, dequantized)
    torch.testing.assert_close(out, want_out, **TOLERANCE[dtype])
    torch.testing.assert_close(lse, want_lse, **TOLERANCE[dtype])


# (shape, key quantization group): several value quantization groups per kept group
# (C = 32, groups of 16), one key group over all of D, key groups splitting a byte's codes
GROUPINGS = {
    "vq2-K2of4-kq64": (Shape(stored=37, tail=3, head_dim=128, group=3, keep=2, groups=4), 64),
    "vq2-K4of4-kq16": (Shape(stored=20, tail=2, head_dim=128, group=2, keep=4, groups=4), 16),
    "K3of8-kq2": (Shape(stored=41, tail=0, head_dim=64, group=4, keep=3, groups=8), 2),
}


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("bits", [8, 4, 2], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", GROUPINGS, ids=list(GROUPINGS))
def test_reference_quantization_groupings(case, dtype, bits):
    """Scales folded per quantization group, however the groups fall on keys and values."""
    shape, key_group = GROUPINGS[case]
    query, kv, _, _ = make_packed(shape, dtype, seed=11)
    quantized, dequantized = quantize_packed(kv, bits, bits, key_group=key_group)
    out, mass = packed_attention_reference.packed_attention(query, quantized, return_mass=True)
    want_out, want_mass = packed_attention_reference.packed_attention(query, dequantized, return_mass=True)
    torch.testing.assert_close(out.float(), want_out.float(), **TOLERANCE[dtype])
    torch.testing.assert_close(mass, want_mass, **TOLERANCE[dtype])


@pytest.mark.parametrize("bits", [8, 4, 2], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_unpack_codes_matches_unpack_bits(dtype, bits):
    """Channel order, exact codes, strided payloads, and a reused buffer larger than needed."""
    generator = torch.Generator().manual_seed(bits)
    payload = torch.randint(0, 256, (2, 3, 40, 20), dtype=torch.uint8, generator=generator).to(DEVICE)
    strided = payload[:, :, 5:37, 2:18]  # [2, 3, 32, 16], not contiguous
    want = unpack_bits(strided, bits).to(dtype)
    torch.testing.assert_close(packed_attention_reference.unpack_codes(strided, bits, dtype), want, rtol=0, atol=0)
    buffer = torch.full((strided.numel() * 8 // bits + 7,), math.nan, dtype=dtype, device=DEVICE)
    got = packed_attention_reference.unpack_codes(strided, bits, dtype, buffer)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got = packed_attention_reference.unpack_codes(strided[:, :, :3], bits, dtype, buffer)  # a shorter last block
    torch.testing.assert_close(got, want[:, :, :3], rtol=0, atol=0)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_prefill_chunk_with_tokens_selected_per_head(dtype):
    """Q > 1 queries, per-head token validity and the attention mass the cache observes."""
    shape = Shape(stored=45, tail=6, head_dim=64, group=2, keep=3, groups=8)
    _, kv, _, _ = make_packed(shape, dtype, seed=3)
    query = torch.randn(2, 4, 6, 64, generator=torch.Generator().manual_seed(3)).to(
        dtype=dtype, device=DEVICE
    )
    quantized, dequantized = quantize_packed(_selected_per_head(kv, 3), 4, 2)
    out, mass = packed_attention_reference.packed_attention(query, quantized, return_mass=True)
    want_out, want_mass = packed_attention_reference.packed_attention(
        query, dequantized, return_mass=True
    )
    torch.testing.assert_close(out.float(), want_out.float(), **TOLERANCE[dtype])
    torch.testing.assert_close(mass, want_mass, **TOLERANCE[dtype])


def test_reference_at_the_real_block_size(monkeypatch):
    """More packed tokens than the smallest real block (`MIN_BLOCK_TOKENS`, 1024), not a
    multiple of it: blocks held to their floor by a tiny byte budget."""
    monkeypatch.setattr(packed_attention_reference, "BLOCK_BYTES", 1)
    shape = Shape(stored=1030, tail=3, head_dim=64, group=2, keep=2, groups=4, batch=1, kv_heads=1)
    query, kv, _, _ = make_packed(shape, torch.float32, seed=4)
    quantized, dequantized = quantize_packed(kv, 4, 4)
    assert packed_attention_reference.block_tokens(shape.head_dim) == packed_attention_reference.MIN_BLOCK_TOKENS
    assert packed_attention_reference.MIN_BLOCK_TOKENS < shape.stored
    out, mass = packed_attention_reference.packed_attention(query, quantized, return_mass=True)
    want_out, want_mass = packed_attention_reference.packed_attention(
        query, dequantized, return_mass=True
    )
    torch.testing.assert_close(out, want_out, **TOLERANCE[torch.float32])
    torch.testing.assert_close(mass, want_mass, **TOLERANCE[torch.float32])


def test_reference_never_unpacks_more_than_a_block(monkeypatch, small_blocks):
    """Codes are unpacked a block of tokens at a time, each once, and nothing is dequantized."""
    seen = []
    unpack = packed_attention_reference.unpack_codes

    def spy(payload, *args):
        seen.append(payload.shape[-2])
        return unpack(payload, *args)

    def no_dequantize(self, dtype):
        raise AssertionError("the reference dequantized a QuantizedTensor")

    query, kv, _, _ = make_packed(SHAPES[0], torch.float32)
    quantized, _ = quantize_packed(kv, 4, 4)
    monkeypatch.setattr(packed_attention_reference, "unpack_codes", spy)
    monkeypatch.setattr(QuantizedTensor, "dequantize", no_dequantize)
    packed_attention_reference.packed_attention(query, quantized)
    assert seen and max(seen) == 16 and sum(seen) == 2 * SHAPES[0].stored  # keys once, values once


# --- Triton (interpreted on a CPU) against the reference ---

triton_only = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

TRITON_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[5]]
TRITON_FORMATS = {**FORMATS, "k2v8": (2, 8), "k8-plain-v": (8, None)}


@triton_only
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=[s.id for s in TRITON_SHAPES])
def test_triton_matches_reference(shape, dtype):
    query, kv, _, _ = make_packed(shape, dtype, seed=5)
    quantized, _ = quantize_packed(kv, 4, 4)
    got = packed_attention(query, quantized)
    assert got.dtype == dtype and got.shape == query.shape
    want = packed_attention_reference.packed_attention(query, quantized)
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


@triton_only
@pytest.mark.parametrize("fmt", TRITON_FORMATS, ids=list(TRITON_FORMATS))
def test_triton_bit_widths(fmt):
    query, kv, _, _ = make_packed(SHAPES[0], torch.float32, seed=6)
    quantized, _ = quantize_packed(kv, *TRITON_FORMATS[fmt])
    want = packed_attention_reference.packed_attention(query, quantized)
    torch.testing.assert_close(packed_attention(query, quantized), want, **TOLERANCE[torch.float32])


@triton_only
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_triton_lse_matches_reference(dtype):
    query, kv, _, _ = make_packed(SHAPES[5], dtype, seed=7)
    quantized, _ = quantize_packed(kv, 8, 2)
    out, lse = packed_attention_lse(query, quantized, scaling=0.3)
    want_out, want_lse = packed_attention_lse_reference(query, quantized, scaling=0.3)
    torch.testing.assert_close(out, want_out, **TOLERANCE[dtype])
    torch.testing.assert_close(lse, want_lse, **TOLERANCE[dtype])


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_tokens_selected_per_head_with_mask(dtype):
    shape = Shape(stored=70, tail=6, head_dim=64, group=3, keep=3, groups=8)
    query, kv, _, _ = make_packed(shape, dtype, seed=8)
    quantized, _ = quantize_packed(_selected_per_head(kv, 8), 4, 4)
    mask = torch.ones(2, 1, 1, 30, dtype=torch.bool, device=DEVICE)
    mask[0, ..., -2] = False
    want = packed_attention_reference.packed_attention(query, quantized, mask)
    torch.testing.assert_close(
        packed_attention(query, quantized, mask).float(), want.float(), **TOLERANCE[dtype]
    )


@triton_only
def test_triton_token_splits_and_tensor_core_path():
    from hf_subtok.kernels.packed_attention_triton import packed_decode_attention_triton

    shape = Shape(stored=200, tail=30, head_dim=64, group=3, keep=3, groups=8)
    query, kv, _, _ = make_packed(shape, torch.float16, seed=9)
    quantized, _ = quantize_packed(kv, 4, 2)
    want_out, want_lse = packed_attention_lse_reference(query, quantized)
    out, lse = packed_decode_attention_triton(
        query, quantized, out_dtype=torch.float32, split_tokens=64, low_precision_dot=True
    )
    torch.testing.assert_close(out, want_out, **TOLERANCE[torch.float16])
    torch.testing.assert_close(lse, want_lse, **TOLERANCE[torch.float16])


def _framed(part: torch.Tensor) -> torch.Tensor:
    """`part` copied into the middle of a buffer poisoned with NaN (0xFF for bytes), strided."""
    fill = 255 if part.dtype == torch.uint8 else math.nan
    buffer = torch.full([n + 4 for n in part.shape], fill, dtype=part.dtype, device=part.device)
    return buffer[tuple(slice(2, 2 + n) for n in part.shape)].copy_(part)


@triton_only
@pytest.mark.parametrize("bits", [8, 4, 2], ids=lambda b: f"int{b}")
def test_triton_reads_only_inside_the_quantized_tensors(bits):
    """Payload, scales and zeros are strided views framed by poison: a read past them shows."""
    query, kv, _, _ = make_packed(SHAPES[0], torch.float32, seed=10)
    quantized, _ = quantize_packed(kv, bits, bits)
    framed = dataclasses.replace(
        quantized, keys=quantized.keys.apply(_framed), values=quantized.values.apply(_framed)
    )
    assert not framed.keys.payload.is_contiguous()
    got = packed_attention(query, framed)
    assert got.isfinite().all()
    want = packed_attention_reference.packed_attention(query, quantized)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
