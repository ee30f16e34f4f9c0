"""The CPU path over quantized storage: byte-sized blocks of tokens, a fixed number of ops.

`packed_attention` on a CPU reads quantized keys and values a block of tokens at a time, the
block as large as `BLOCK_BYTES` of float32 codes allows (`block_tokens`), so a decode step's
op count does not grow with the context. Oracle: attention over the dequantized tensors
(`dequantize()`), over awkward shapes, blocks crossing token edges, K < G, shared rows, wide
tokens, per-channel keys and every float dtype. `torch.empty` is NaN-filled.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_subtok.kernels import packed_attention, packed_attention_reference
from hf_subtok.kernels.packed_attention_reference import block_tokens
from hf_subtok.quant import quantize, quantize_channels
from hf_subtok.views import PackedKV
from tests import kernel_cases as cases
from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("nan_empty")

SHAPES = [
    cases.Shape(stored=63, tail=5, head_dim=64, group=3, keep=2, groups=2, batch=1, kv_heads=3),  # balanced's layout
    cases.Shape(stored=63, tail=0, head_dim=64, group=3, keep=1, groups=2, batch=1, kv_heads=3),  # K < G, no tail
    cases.Shape(stored=130, tail=9, head_dim=64, group=2, keep=3, groups=8),
    cases.Shape(stored=1, tail=1, head_dim=32, group=1, keep=4, groups=4),
]
FORMATS = {"k4v4": (4, 4), "k8v2": (8, 2), "k2v8": (2, 8), "plain-k-v4": (None, 4)}
# (BLOCK_BYTES, MIN_BLOCK_TOKENS): one block of every token, or blocks of a few tokens
BLOCKS = {"one-block": (8 << 20, 1024), "17-token-blocks": None}


@pytest.fixture(params=list(BLOCKS))
def blocks(request, monkeypatch):
    """Blocks of the default size, or of 17 tokens (every case but T=1 crosses block edges)."""
    if BLOCKS[request.param] is None:
        monkeypatch.setattr(packed_attention_reference, "MIN_BLOCK_TOKENS", 1)
        monkeypatch.setattr(packed_attention_reference, "BLOCK_TOKENS", 17)
    return request.param


def _assert_attention_equal(query, quantized, dequantized, dtype):
    with torch.no_grad():
        out, mass = packed_attention(query, quantized, return_mass=True, backend="torch")
        want_out, want_mass = packed_attention(query, dequantized, return_mass=True, backend="torch")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want_out.float(), **cases.TOLERANCE[dtype])
    torch.testing.assert_close(mass, want_mass, **cases.TOLERANCE[dtype])


@pytest.mark.usefixtures("blocks")
@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("dtype", cases.DTYPES.values(), ids=cases.DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_quantized_equals_attention_over_dequantized(shape, dtype, fmt):
    query, kv, _, _ = cases.make_packed(shape, dtype, seed=3, device="cpu")
    kv = dataclasses.replace(kv, backend="torch")
    _assert_attention_equal(query, *cases.quantize_packed(kv, *FORMATS[fmt]), dtype)


@pytest.mark.usefixtures("blocks")
@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("dtype", cases.DTYPES.values(), ids=cases.DTYPES.keys())
def test_channel_keys_equal_attention_over_dequantized(dtype, bits):
    """compact's keys: per channel over blocks of 8 tokens, evicted out of order (`take`)."""
    shape = cases.Shape(stored=75, tail=4, head_dim=64, group=3, keep=2, groups=2, batch=1, kv_heads=3)
    query, kv, _, _ = cases.make_packed(shape, dtype, seed=5, device="cpu")
    keys = quantize_channels(kv.keys, bits, 8)
    keep = torch.sort(torch.randperm(75, generator=torch.Generator().manual_seed(1))[:63]).values
    keys = keys.take(keep.view(1, 1, -1).expand(1, 3, -1))
    values = quantize(kv.values[:, :, :, keep], bits, 32)
    group_idx = kv.group_idx[..., keep]
    quantized = dataclasses.replace(kv, keys=keys, values=values, group_idx=group_idx, backend="torch")
    dequantized = dataclasses.replace(quantized, keys=keys.dequantize(dtype), values=values.dequantize(dtype))
    _assert_attention_equal(query, quantized, dequantized, dtype)


@pytest.mark.usefixtures("blocks")
@pytest.mark.parametrize("bits", [2, 4], ids=lambda b: f"int{b}")
def test_shared_row_matches_each_head_alone(bits):
    query, kv, per_head = cases.shared_row([20, 33, 11], bits=bits, wide=5, device="cpu")
    with torch.no_grad():
        out = packed_attention(query, kv, backend="torch")  # [1, Hq, 1, D]
    for head, (keys, values) in enumerate(per_head):
        q = query[0, 2 * head : 2 * head + 2, 0]  # [R, D]
        want = torch.softmax(q @ keys.T * keys.shape[-1] ** -0.5, dim=-1) @ values
        torch.testing.assert_close(out[0, 2 * head : 2 * head + 2, 0], want, **cases.TOLERANCE[torch.float32])


@pytest.mark.usefixtures("blocks")
@pytest.mark.parametrize("dtype", cases.DTYPES.values(), ids=cases.DTYPES.keys())
def test_wide_tokens_equal_attention_over_dequantized(dtype):
    shape = cases.Shape(stored=40, tail=3, head_dim=64, group=2, keep=2, groups=4)
    query, kv, keys, values = cases.with_wide_tokens(shape, dtype, wide=9, bits=4)
    with torch.no_grad():
        out = packed_attention(query, dataclasses.replace(kv, backend="torch"))
    scores = query.float().view(2, 2, 2, 64) @ keys.float().transpose(-1, -2) * 64**-0.5  # [B, Hkv, R, T]
    want = (scores.softmax(-1) @ values.float()).view(2, 4, 1, 64)
    torch.testing.assert_close(out.float(), want, **cases.TOLERANCE[dtype])


def test_block_tokens_by_bytes(monkeypatch):
    layer = 3 * 64  # SmolLM2-135M: 3 KV heads x 64 channels of float32 codes per token
    assert block_tokens(layer) == (8 << 20) // (4 * layer) == 10922  # 4k-10k tokens: one block
    assert block_tokens(10**9) == 1024  # never fewer than MIN_BLOCK_TOKENS
    assert block_tokens(0) == packed_attention_reference.BLOCK_TOKENS
    monkeypatch.setattr(packed_attention_reference, "BLOCK_TOKENS", 16)
    assert block_tokens(layer) == 16


CountOps = load_benchmark("cpu_decode_attention").CountOps


def _preset_layer(tokens: int, channel_keys: bool) -> tuple[torch.Tensor, PackedKV]:
    """One decode step's inputs in a preset's layout (SmolLM2-135M's layer): `balanced` (4-bit
    keys per token group of 32, 4-bit values, G = K = 2) or `compact` (2-bit keys per channel
    over 32-token blocks, 2-bit values), every token valid, an 11-token tail."""
    generator = torch.Generator().manual_seed(tokens)
    keys = torch.randn(1, 3, tokens, 64, generator=generator)
    values = torch.randn(1, 3, 2, tokens, 32, generator=generator)
    bits = 2 if channel_keys else 4
    stored_keys = quantize_channels(keys, bits, 32) if channel_keys else quantize(keys, bits, 32)
    group_idx = torch.arange(2, dtype=torch.uint8).view(1, 1, 2, 1).expand(1, 3, 2, tokens)  # implied groups
    tail = torch.randn(2, 1, 3, 11, 64, generator=generator)
    valid = torch.ones(1, 3, tokens, dtype=torch.bool)
    kv = PackedKV(stored_keys, quantize(values, bits, 32), group_idx, 2, tail[0], tail[1], "torch", stored_valid=valid)
    return torch.randn(1, 9, 1, 64, generator=generator), kv


@pytest.mark.parametrize("channel_keys", [False, True], ids=["balanced", "compact"])
def test_decode_step_op_count_does_not_grow_with_tokens(channel_keys):
    """One decode step's packed attention makes the same number of torch ops at 2k, 4k and 8k
    tokens (one block each), at most 140; 1024-token blocks made 270 (balanced) and 337
    (compact) at 4k, growing with T."""
    counts = []
    for tokens in (2048, 4096, 8192):
        query, kv = _preset_layer(tokens, channel_keys)
        with torch.no_grad(), CountOps() as ops:
            packed_attention(query, kv, return_mass=True)
        counts.append(ops.count)
    assert counts[0] == counts[1] == counts[2] <= 140, counts
