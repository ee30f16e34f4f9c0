"""The Triton decode kernel over per-channel quantized keys (`ChannelQuantizedTensor`).

Keys come from `quantize_channels` (optionally evicted with `take`, so block indices are out
of order and the tables compacted); the kernel (interpreted on a CPU) must equal the PyTorch
reference, which scales each block of keys by the scale rows its tokens name. `torch.empty`
is NaN-filled so reads of unwritten memory fail.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass

import pytest
import torch

from hf_subtok.kernels import packed_attention, packed_attention_lse, packed_attention_reference
from hf_subtok.kernels.merge import packed_attention_lse_reference
from hf_subtok.quant import ChannelQuantizedTensor, quantize, quantize_channels
from hf_subtok.views import PackedKV
from tests.kernel_cases import DEVICE, DTYPES, TOLERANCE, Shape, make_packed

pytestmark = [
    pytest.mark.usefixtures("nan_empty"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]


@dataclass(frozen=True)
class Case:
    """A `Shape` plus how its keys and values are stored."""

    shape: Shape
    key_bits: int = 4
    block_size: int = 32
    evicted: bool = False  # keys gathered by `take`: blocks out of order, tables compacted
    value_bits: int | None = None  # None: plain values
    per_head: bool = False  # stored_valid given

    @property
    def id(self) -> str:
        parts = [self.shape.id, f"k{self.key_bits}", f"bs{self.block_size}"]
        parts += ["plain-v" if self.value_bits is None else f"v{self.value_bits}"]
        parts += ["evicted"] * self.evicted + ["per-head"] * self.per_head
        return "-".join(parts)


def _channel_keys(shape: Shape, dtype: torch.dtype, bits: int, block_size: int, evicted: bool, seed: int):
    """`[B, Hkv, Ts, D]` keys with per-channel ranges, quantized per channel. Evicted: quantized
    over more tokens, then each (batch, head) row keeps `Ts` of them in random order, never
    from one whole block of its own (so every row's table shrinks and indices get renumbered)."""
    generator = torch.Generator().manual_seed(seed)
    b, h, d = shape.batch, shape.kv_heads, shape.head_dim
    tokens = shape.stored + 2 * block_size if evicted else shape.stored
    ranges = torch.exp(torch.randn(b, h, 1, d, generator=generator))  # outlier channels
    offsets = torch.randn(b, h, 1, d, generator=generator)
    dense = (torch.randn(b, h, tokens, d, generator=generator) * ranges + offsets).to(dtype=dtype, device=DEVICE)
    keys = quantize_channels(dense, bits, block_size)
    if not evicted:
        return keys
    full_blocks = tokens // block_size
    rows = []
    for row in range(b * h):
        dropped = row % full_blocks
        kept = torch.cat([torch.arange(dropped * block_size), torch.arange((dropped + 1) * block_size, tokens)])
        rows.append(kept[torch.randperm(len(kept), generator=generator)[: shape.stored]])
    index = torch.stack(rows).view(b, h, shape.stored).to(DEVICE)  # [B, Hkv, Ts]
    taken = keys.take(index)
    assert taken.scale.shape[-2] < keys.scale.shape[-2]  # tables compacted
    return taken


def make_case(case: Case, dtype: torch.dtype, seed: int = 0):
    """`(query [B, Hq, 1, D], kv)` with per-channel keys."""
    shape = case.shape
    query, kv, _, _ = make_packed(shape, dtype, seed=seed)
    keys = _channel_keys(shape, dtype, case.key_bits, case.block_size, case.evicted, seed)
    values = kv.values if case.value_bits is None else quantize(kv.values, case.value_bits, min(kv.values.shape[-1], 16))
    kv = dataclasses.replace(kv, keys=keys, values=values)
    if case.per_head:
        generator = torch.Generator().manual_seed(seed + 1)
        valid = torch.rand(shape.batch, shape.kv_heads, shape.stored, generator=generator) > 0.3
        kv = dataclasses.replace(kv, stored_valid=valid.to(DEVICE))
    return query, kv


def _check(query: torch.Tensor, kv: PackedKV, dtype: torch.dtype, mask: torch.Tensor | None = None):
    got = packed_attention(query, kv, mask)
    assert got.dtype == dtype and got.shape == query.shape and got.isfinite().all()
    want = packed_attention_reference.packed_attention(query, kv, mask)
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


BASE = Shape(stored=130, tail=9, head_dim=64, group=2, keep=3, groups=8)


@pytest.mark.parametrize("bits", [8, 4, 2], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_triton_matches_reference_bits_and_dtypes(dtype, bits):
    query, kv = make_case(Case(BASE, key_bits=bits), dtype, seed=bits)
    assert isinstance(kv.keys, ChannelQuantizedTensor) and kv.keys.scale.dtype == (
        torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    )
    _check(query, kv, dtype)


CASES = [
    Case(Shape(stored=1, tail=1, head_dim=64, group=1, keep=4, groups=4, batch=1)),  # one token, K = G
    Case(Shape(stored=37, tail=0, head_dim=128, group=8, keep=1, groups=8), key_bits=2, block_size=16),  # empty tail, K = 1
    Case(Shape(stored=130, tail=5, head_dim=128, group=4, keep=5, groups=8), key_bits=8, value_bits=4),
    Case(Shape(stored=37, tail=3, head_dim=64, group=2, keep=2, groups=4, kv_heads=3), block_size=16, value_bits=2),
    Case(Shape(stored=130, tail=0, head_dim=64, group=8, keep=8, groups=8), key_bits=2, evicted=True),
    Case(Shape(stored=37, tail=6, head_dim=128, group=1, keep=3, groups=4), block_size=16, evicted=True, value_bits=8),
    Case(Shape(stored=1, tail=4, head_dim=64, group=4, keep=1, groups=2), key_bits=8, evicted=True, per_head=True),
    Case(Shape(stored=130, tail=7, head_dim=64, group=2, keep=6, groups=8), block_size=16, evicted=True, value_bits=4, per_head=True),
    Case(Shape(stored=37, tail=0, head_dim=128, group=8, keep=2, groups=2), key_bits=2, per_head=True),
    Case(Shape(stored=0, tail=5, head_dim=64, group=2, keep=2, groups=4)),  # no packed tokens, empty tables
]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_triton_matches_reference(case, dtype):
    query, kv = make_case(case, dtype, seed=3)
    if case.evicted:
        block = kv.keys.token_blocks()
        assert case.shape.stored == 1 or (block.diff(dim=-1) < 0).any()  # out of order
        assert int(block.max()) < kv.keys.scale.shape[-2]
    _check(query, kv, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_tokens_selected_per_head_with_mask(dtype):
    """With stored_valid the mask covers only the tail (its last columns)."""
    case = Case(Shape(stored=70, tail=6, head_dim=64, group=3, keep=3, groups=8), evicted=True, per_head=True)
    query, kv = make_case(case, dtype, seed=8)
    mask = torch.ones(2, 1, 1, 30, dtype=torch.bool, device=DEVICE)
    mask[0, ..., -2] = False
    _check(query, kv, dtype, mask)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_triton_lse_matches_reference(dtype):
    case = Case(Shape(stored=37, tail=8, head_dim=64, group=5, keep=2, groups=4), key_bits=2, evicted=True, value_bits=8)
    query, kv = make_case(case, dtype, seed=7)
    out, lse = packed_attention_lse(query, kv, scaling=0.3)
    want_out, want_lse = packed_attention_lse_reference(query, kv, scaling=0.3)
    torch.testing.assert_close(out, want_out, **TOLERANCE[dtype])
    torch.testing.assert_close(lse, want_lse, **TOLERANCE[dtype])


def test_triton_token_splits_and_tensor_core_path():
    from hf_subtok.kernels.packed_attention_triton import packed_decode_attention_triton

    case = Case(Shape(stored=200, tail=30, head_dim=64, group=3, keep=3, groups=8), block_size=16, evicted=True, value_bits=2)
    query, kv = make_case(case, torch.float16, seed=9)
    want_out, want_lse = packed_attention_lse_reference(query, kv)
    out, lse = packed_decode_attention_triton(query, kv, out_dtype=torch.float32, split_tokens=64, low_precision_dot=True)
    torch.testing.assert_close(out, want_out, **TOLERANCE[torch.float16])
    torch.testing.assert_close(lse, want_lse, **TOLERANCE[torch.float16])


def _framed(part: torch.Tensor) -> torch.Tensor:
    """`part` copied into the middle of a buffer poisoned with NaN (integers: their max),
    strided in every dim."""
    fill = math.nan if part.is_floating_point() else torch.iinfo(part.dtype).max
    buffer = torch.full([n + 4 for n in part.shape], fill, dtype=part.dtype, device=part.device)
    return buffer[tuple(slice(2, 2 + n) for n in part.shape)].copy_(part)


@pytest.mark.parametrize("bits", [8, 4, 2], ids=lambda b: f"int{b}")
def test_triton_reads_only_inside_the_channel_quantized_keys(bits):
    """Payload, block runs and tables are strided views framed by poison (a wrong block index
    or a read past a table shows)."""
    case = Case(Shape(stored=130, tail=9, head_dim=64, group=3, keep=3, groups=8), key_bits=bits, evicted=True)
    query, kv = make_case(case, torch.float32, seed=10)
    keys = kv.keys
    framed = ChannelQuantizedTensor(
        _framed(keys.payload), _framed(keys.run_block), _framed(keys.run_length),
        _framed(keys.scale), _framed(keys.zero), keys.bits, keys.block_size,
    )
    assert not framed.payload.is_contiguous() and not framed.run_length.is_contiguous()
    got = packed_attention(query, dataclasses.replace(kv, keys=framed))
    assert got.isfinite().all()
    want = packed_attention_reference.packed_attention(query, kv)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


# --- bad inputs raise before any launch ---


@pytest.fixture
def no_launch(monkeypatch):
    """Make the decode launcher fail loudly if called."""
    from hf_subtok.kernels import packed_attention_triton

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(packed_attention_triton, "packed_decode_attention_triton", refuse)


def _rebuilt(keys: ChannelQuantizedTensor, **parts) -> ChannelQuantizedTensor:
    fields = {
        "payload": keys.payload, "run_block": keys.run_block, "run_length": keys.run_length,
        "scale": keys.scale, "zero": keys.zero, **parts,
    }
    return ChannelQuantizedTensor(**fields, bits=keys.bits, block_size=keys.block_size)


def _with_runs(keys: ChannelQuantizedTensor, run_block: torch.Tensor) -> ChannelQuantizedTensor:
    """`keys` with its runs' blocks replaced behind its back (it is frozen and validates)."""
    broken = _rebuilt(keys)
    object.__setattr__(broken, "run_block", run_block)
    return broken


def _transposed_copy(x: torch.Tensor) -> torch.Tensor:
    """Same values, last dim strided."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _bad_channel_keys():
    shape = Shape(stored=10, tail=3, head_dim=64, group=2, keep=3, groups=8)
    query, kv = make_case(Case(shape, block_size=4), torch.float32)
    keys = kv.keys  # payload [2, 2, 10, 32], runs [2, 2, 3], scale and zero [2, 2, 3, 64]
    other_strides = keys.zero.transpose(0, 1).contiguous().transpose(0, 1)  # same values
    cases = {
        "scale-zero-strides": (_rebuilt(keys, zero=other_strides), r"kv.keys.scale and kv.keys.zero must have equal strides .*got \(384, 192, 64, 1\) and \(192, 384, 64, 1\)"),
        "payload-last-dim": (_rebuilt(keys, payload=_transposed_copy(keys.payload)), r"kv.keys.payload must be contiguous in its last dim .*got strides \(640, 320, 1, 10\)"),
        "tables-last-dim": (_rebuilt(keys, scale=_transposed_copy(keys.scale), zero=_transposed_copy(keys.zero)), r"kv.keys.scale must be contiguous in its last dim .*got strides \(384, 192, 1, 3\)"),
        "run-block-int32": (_with_runs(keys, keys.run_block.int()), r"kv.keys: payload must be uint8, run_block torch.int16 and run_length torch.int32, got torch.uint8, torch.int32 and torch.int32"),
        "runs-shape": (_with_runs(keys, keys.run_block[..., :2]), r"kv.keys: payload \[..., T, N\*bits/8\], run_block and run_length \[..., R\] .* do not fit: \(2, 2, 10, 32\), \(2, 2, 2\), \(2, 2, 3\)"),
        "head-dim": (quantize_channels(torch.randn(2, 2, 10, 32, device=DEVICE), 4, 4), r"kv.keys must be \[B=2, Hkv, T, D=64\], got \(2, 2, 10, 32\)"),
    }  # fmt: skip
    return {name: ((query, dataclasses.replace(kv, keys=bad)), message) for name, (bad, message) in cases.items()}


BAD_CHANNEL_KEYS = _bad_channel_keys()


@pytest.mark.parametrize("case", BAD_CHANNEL_KEYS, ids=list(BAD_CHANNEL_KEYS))
def test_bad_channel_keys_rejected_before_launch(case, no_launch):
    args, message = BAD_CHANNEL_KEYS[case]
    with pytest.raises(ValueError, match=message):
        packed_attention(*args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_long_context_with_two_bit_channel_keys_on_gpu(dtype):
    """Token splits with 2-bit per-channel keys (evicted: blocks out of order), 2-bit values,
    tokens selected per head, the tensor-core path and the scores the cache observes."""
    case = Case(Shape(stored=9000, tail=33, head_dim=128, group=4, keep=3, groups=8, batch=1),
                key_bits=2, block_size=64, evicted=True, value_bits=2, per_head=True)  # fmt: skip
    query, kv = make_case(case, dtype, seed=15)
    out, lse = packed_attention_lse(query, kv)
    want_out, want_lse = packed_attention_lse_reference(query, kv)
    torch.testing.assert_close(out.float(), want_out.float(), **TOLERANCE[dtype])
    torch.testing.assert_close(lse, want_lse, **TOLERANCE[dtype])
    _check(query, kv, dtype)
