"""Scales as 8-bit logarithms (`log_scales`, `quant.logscale`): per-channel key scales at the
code of least error next to the exact scale, codeword values' scales at the nearest code;
read alike by the reference and the Triton kernel (interpreted here); counted as one byte
each."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.kernels import packed_attention, packed_attention_reference
from hf_subtok.quant import quantize_channels, quantize_vectors
from hf_subtok.quant.logscale import LOG_STEPS, decode_log_scale, encode_log_scale
from tests.kernel_cases import (
    DEVICE,
    DTYPES,
    TOLERANCE,
    Shape,
    make_packed,
)
from tests.tiny_models import greedy_per_backend, make_tiny_model, random_prompts

_WIDE = dict(head_dim=64, num_attention_heads=2, num_key_value_heads=1, hidden_size=128)
STEP = 2 ** (1 / LOG_STEPS)  # ratio of neighbouring codes

pytestmark = pytest.mark.usefixtures("nan_empty")
triton_only = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_codes_round_up_or_to_the_nearest_within_one_step(dtype):
    scale = torch.logspace(-4, 4, 2001, dtype=torch.float64).to(dtype)
    up = decode_log_scale(encode_log_scale(scale, round_up=True))
    nearest = decode_log_scale(encode_log_scale(scale, round_up=False))
    exact = scale.float()
    assert (up >= exact).all() and (up < exact * STEP * (1 + 1e-6)).all()
    assert (nearest / exact).sub(1).abs().max() <= STEP**0.5 - 1 + 1e-6
    codes = encode_log_scale(scale, round_up=False)
    assert (codes[1:] >= codes[:-1]).all()  # monotone


def test_zero_codes_zero_and_the_range_is_clamped():
    scale = torch.tensor([0.0, 1e-30, 1.0, 1e30])
    codes = encode_log_scale(scale, round_up=True)
    assert codes.tolist() == [0, 1, 128, 255]
    assert decode_log_scale(codes)[0] == 0 and decode_log_scale(codes)[2] == 1


def _block_errors(x: torch.Tensor, q, block_size: int) -> torch.Tensor:
    """Squared error per (channel, block) of `q` (quantized, or read back) against `x` `[..., T,
    N]` (one sink first, then blocks of `block_size`)."""
    read = q if isinstance(q, torch.Tensor) else q.dequantize(torch.float32)
    miss = (read - x.float()).square()  # [..., T, N]
    block = torch.cat([torch.zeros(1), 1 + torch.arange(x.shape[-2] - 1) // block_size]).long().to(x.device)
    return torch.zeros(*x.shape[:-2], int(block.max()) + 1, x.shape[-1], device=x.device).index_add_(-2, block, miss)


@pytest.mark.parametrize("bits", [8, 4, 2], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_each_key_block_takes_the_log_scale_of_least_error(dtype, bits):
    """Per (channel, block), the logarithmic grid errs no more than the covering one (the code
    just above the float16 scale, same zero: every element within half its step), and scales
    stay within a code of the float16 ones."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 37, 64, generator=generator) * torch.rand(64, generator=generator).mul(5).exp())
    x = x.to(dtype=dtype, device=DEVICE)
    q = quantize_channels(x, bits, 16, solo=1, log_scale=True)
    plain = quantize_channels(x, bits, 16, solo=1)
    assert q.scale.dtype == torch.uint8 and q.zero.dtype == plain.zero.dtype
    levels = (1 << bits) - 1
    zero = plain.token_scales()[1]  # [..., T, N]: the float16 grid's zero, with the code just above its scale
    step = decode_log_scale(encode_log_scale(plain.token_scales()[0], round_up=True))
    covering = ((x.float() - zero) / step.clamp_min(1e-30)).round().clamp(0, levels) * step + zero
    assert ((covering - x.float()).abs() <= step / 2 + 1e-5 * x.float().abs().amax()).all()
    slack = 1e-6 * x.float().square().sum()
    assert (_block_errors(x, q, 16) <= _block_errors(x, covering, 16) + slack).all()
    ratio = decode_log_scale(q.scale) / plain.scale.float().clamp_min(1e-30)
    used = plain.scale.float() > decode_log_scale(torch.tensor(1, dtype=torch.uint8)).to(ratio.device)
    assert (ratio[used] >= 1 / STEP - 1e-6).all() and (ratio[used] <= STEP + 1e-6).all()


def test_values_with_log_scales_keep_their_codebook_and_a_scale_within_half_a_step():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 50, 32, generator=generator) * torch.rand(2, 2, 50, 1, generator=generator).mul(4).exp()
    q = quantize_vectors(x, 16, 4, log_scale=True)
    assert q.scale.dtype == torch.uint8 and q.codebook.dtype == torch.float16
    rms = x.square().mean(-1, keepdim=True).sqrt()
    ratio = decode_log_scale(q.scale) / rms
    assert (ratio - 1).abs().max() <= STEP**0.5 - 1 + 1e-6
    words = q.dequantize(torch.float32) / decode_log_scale(q.scale)  # [..., T, N]: codewords only
    later = quantize_vectors(x, 16, 4, codebook=q.codebook, log_scale=True)  # coded against the same words
    torch.testing.assert_close(later.dequantize(torch.float32) / decode_log_scale(later.scale), words)


SHAPES = [
    Shape(stored=70, tail=5, head_dim=64, group=3, keep=8, groups=8),
    Shape(stored=33, tail=0, head_dim=128, group=2, keep=1, groups=1, kv_heads=3),
]


def _log_scaled(kv):
    """`kv` with keys per channel and values as codewords, both with log scales, and the same
    with them dequantized to the query's dtype."""
    keys = quantize_channels(kv.keys, 2, 16, solo=1, log_scale=True)
    values = quantize_vectors(kv.values, 16, 4, log_scale=True)
    dtype = kv.tail_keys.dtype
    stored = dataclasses.replace(kv, keys=keys, values=values, backend="torch")
    dense = dataclasses.replace(kv, keys=keys.dequantize(dtype), values=values.dequantize(dtype), backend="torch")
    return stored, dense


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_reference_reads_log_scales_as_their_values(shape, dtype, monkeypatch):
    monkeypatch.setattr(packed_attention_reference, "BLOCK_TOKENS", 16)
    query, kv, _, _ = make_packed(shape, dtype, seed=4)
    stored, dense = _log_scaled(kv)
    torch.testing.assert_close(packed_attention(query, stored), packed_attention(query, dense), **TOLERANCE[dtype])


@triton_only
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_triton_reads_log_scales_as_the_reference(shape, dtype):
    query, kv, _, _ = make_packed(shape, dtype, seed=5)
    stored, _ = _log_scaled(kv)
    got = packed_attention(query, stored, backend="triton")
    want = packed_attention(query, stored)
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


def _config(**extra) -> SubTokenConfig:
    return SubTokenConfig(
        axes="groups", num_groups=1, keep_groups=1, bits=2, rotate=True, value_codes=16, key_block=32, **extra
    )


@pytest.mark.parametrize("which", ["keys", "values", "both"])
def test_log_scales_save_a_byte_per_key_scale_and_per_value_scale(which):
    plain = _config(window=0).storage_format(64, 4)
    logged = _config(window=0, log_scales=which).storage_format(64, 4)
    assert plain.key_block_bytes - logged.key_block_bytes == (64 if which != "values" else 0)  # a byte per channel
    assert plain.slot_bytes - logged.slot_bytes == (1 if which != "keys" else 0)


@pytest.mark.parametrize("which", ["keys", "values", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_measured_bytes_match_the_format_with_log_scales(dtype, which):
    model = make_tiny_model("llama", dtype=dtype, **_WIDE)
    # packed from the first token (a 100-token context is under the default floor)
    cache = SubTokenCache(model, _config(window=0, log_scales=which, floor_tokens=0))
    tokens = 100
    with torch.no_grad():
        model(input_ids=random_prompts(2, tokens), past_key_values=cache)
    rows = cache.layers[0].row_layers()  # the batch is stored row by row
    assert len(rows) == 2
    for layer in rows:
        assert layer.packed_keys.shape[-2] == tokens
        assert (layer.packed_keys.scale.dtype == torch.uint8) == (which != "values")
        assert (layer.packed_values.scale.dtype == torch.uint8) == (which != "keys")
    blocks = 4 + -(-(tokens - 4) // 32)
    row = rows[0].storage.row_bytes(tokens, blocks, 1, scored=False)
    # one float32 Hadamard matrix [64, 64] rotates keys and value groups (both 64 channels
    # here); shared by every layer and row, it is counted once
    rotation = 64 * 64 * 4
    assert cache.memory_report()["stored_bytes"] == 2 * 2 * row + rotation  # layers x batch, the matrix


@triton_only
def test_greedy_tokens_match_whichever_path_reads_log_scales():
    model = make_tiny_model("llama", **_WIDE)
    tokens = greedy_per_backend(model, _config(window=2, log_scales="both", floor_tokens=0), random_prompts(2, 40), 12)
    assert torch.equal(tokens["torch"], tokens["triton"])


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(bits=None, log_scales="keys"), "log_scales='keys' needs keys quantized per channel"),
        (dict(bits=4, key_quantization="token", value_codes=16, log_scales="both"), "log_scales='both' needs keys quantized per channel"),
        (dict(bits=2, log_scales="values"), "log_scales='values' needs value_codes"),
        (dict(bits=2, log_scales=True), r"log_scales must be one of \('none', 'keys', 'values', 'both'\), got True"),
    ],
    ids=["keys-no-bits", "both-token-keys", "values-scalar-values", "a-bool"],
)
def test_log_scales_without_scales_to_store_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SubTokenConfig(**settings)
