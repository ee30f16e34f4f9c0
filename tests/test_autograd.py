"""The cache and its CPU attention path under autograd and across inference modes.

A user's manual decode loop without `torch.no_grad()` records autograd: the reference
attention then builds fresh tensors instead of writing into reused buffers and `out=`
arguments (which autograd refuses), and gives the no-grad result. Its gradients are checked
against dense attention over the same keys and values (dropped groups zero).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.kernels import packed_attention
from hf_subtok.kernels import packed_attention_reference as reference
from hf_subtok.kernels.pack_reference import unpack_value_groups
from hf_subtok.quant import quantize, quantize_channels, quantize_vectors
from tests.kernel_cases import Shape, make_packed
from tests.tiny_models import make_tiny_model, random_prompts

CONFIGS = {
    "budget-0.1": SubTokenConfig(budget=0.1, recipe=None),
    "budget-0.25": SubTokenConfig(budget=0.25, recipe=None),
    "groups-only": "groups-only",
}
PROMPT, STEPS = 300, 3


def _decode_loop(model, config, grad: bool, fill_mode=None) -> list[torch.Tensor]:
    """Logits of a prompt then `STEPS` single-token steps through a fresh cache, every forward
    under `torch.enable_grad()` (grad) or `torch.no_grad()`, or the prompt and first step under
    `fill_mode` when given."""
    cache = SubTokenCache(model, config)
    inputs = [random_prompts(2, PROMPT)] + [random_prompts(2, 1, seed=100 + s) for s in range(STEPS)]
    logits = []
    for i, ids in enumerate(inputs):
        mode = torch.enable_grad() if grad else torch.no_grad()
        if fill_mode is not None and i < 2:
            mode = fill_mode()
        with mode:
            logits.append(model(input_ids=ids, past_key_values=cache).logits[:, -1].detach().clone())
    return logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_with_grad_enabled_matches_no_grad(name):
    """A manual loop that forgets `torch.no_grad()` decodes what the no-grad loop decodes."""
    model = make_tiny_model("llama")
    expected = _decode_loop(model, CONFIGS[name], grad=False)
    got = _decode_loop(model, CONFIGS[name], grad=True)
    assert len(got) == STEPS + 1
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cache_filled_under_inference_mode_continues_under_no_grad(name):
    """A cache filled under `torch.inference_mode()` (the prompt and one step) keeps decoding
    under `torch.no_grad()`, as the loop under `no_grad` alone does."""
    model = make_tiny_model("llama")
    expected = _decode_loop(model, CONFIGS[name], grad=False)
    got = _decode_loop(model, CONFIGS[name], grad=False, fill_mode=torch.inference_mode)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {step}")


def _dense_attention(query, keys, values, scaling):
    """Plain softmax attention, `[B, Hq, Q, D]` over `[B, Hkv, T, D]` (query head h*R + r reads
    KV head h), in float32: the oracle."""
    repeat = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(repeat, 1).float(), values.repeat_interleave(repeat, 1).float()
    probs = (query.float() @ keys.transpose(-1, -2) * scaling).softmax(-1)
    return probs @ values


CASES = [
    Shape(stored=37, tail=5, head_dim=32, group=2, keep=3, groups=8),  # K < G: slots spread
    Shape(stored=37, tail=5, head_dim=32, group=2, keep=4, groups=4),  # K = G: one matmul per slot
]


@pytest.mark.parametrize("shape", CASES, ids=[s.id for s in CASES])
def test_reference_gradients_match_dense_attention(shape, monkeypatch):
    """Gradients through the packed reference (query, packed keys, kept value groups, tail) equal
    those of dense attention over the same keys and values with the dropped groups zero (blocks
    of 8 tokens: nothing autograd saved from one block is overwritten by the next)."""
    monkeypatch.setattr(reference, "BLOCK_TOKENS", 8)
    query, kv, _, _ = make_packed(shape, torch.float32, device="cpu")
    kv = dataclasses.replace(kv, backend="torch")
    leaves = {
        "query": query.requires_grad_(),
        "keys": kv.keys.requires_grad_(),
        "values": kv.values.requires_grad_(),
        "tail_keys": kv.tail_keys.requires_grad_(),
        "tail_values": kv.tail_values.requires_grad_(),
    }
    weights = torch.randn(shape.batch, query.shape[1], 1, shape.head_dim, generator=torch.Generator().manual_seed(1))
    scaling = shape.head_dim**-0.5

    out = packed_attention(query, kv, None, scaling)
    got = torch.autograd.grad((out * weights).sum(), list(leaves.values()))

    dense_values = unpack_value_groups(kv.values, kv.group_idx, shape.groups)  # differentiable in the kept groups
    keys = torch.cat([kv.keys, kv.tail_keys], dim=2)
    values = torch.cat([dense_values, kv.tail_values], dim=2)
    dense_out = _dense_attention(query, keys, values, scaling)
    expected = torch.autograd.grad((dense_out * weights).sum(), list(leaves.values()))

    torch.testing.assert_close(out.detach(), dense_out.detach(), atol=1e-5, rtol=1e-4)
    for name, a, b in zip(leaves, got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


STORAGES = {
    "int4-keys-values": lambda kv: dataclasses.replace(
        kv, keys=quantize(kv.keys, 4, 16), values=quantize(kv.values, 4, min(kv.values.shape[-1], 16))
    ),
    "channel-keys": lambda kv: dataclasses.replace(kv, keys=quantize_channels(kv.keys, 4, 8)),
    "coded-values": lambda kv: dataclasses.replace(kv, values=quantize_vectors(kv.values, 16, 2)),
}


@pytest.mark.parametrize("shape", CASES, ids=[s.id for s in CASES])
@pytest.mark.parametrize("storage", list(STORAGES))
def test_quantized_reference_under_autograd(shape, storage, monkeypatch):
    """Quantized storage read under autograd, in blocks of 8 tokens: the output equals the
    no-grad output, and the query's gradient equals dense attention's over the dequantized keys
    and values."""
    monkeypatch.setattr(reference, "BLOCK_TOKENS", 8)
    query, kv, _, _ = make_packed(shape, torch.float32, device="cpu")
    kv = STORAGES[storage](dataclasses.replace(kv, backend="torch"))
    scaling = shape.head_dim**-0.5
    with torch.no_grad():
        expected_out = packed_attention(query, kv, None, scaling)
    query.requires_grad_()
    out = packed_attention(query, kv, None, scaling)
    torch.testing.assert_close(out.detach(), expected_out, atol=1e-5, rtol=1e-5)
    (got,) = torch.autograd.grad(out.sum(), query)

    keys = kv.keys if isinstance(kv.keys, torch.Tensor) else kv.keys.dequantize(torch.float32)
    values = kv.values if isinstance(kv.values, torch.Tensor) else kv.values.dequantize(torch.float32)
    dense_keys = torch.cat([keys, kv.tail_keys], dim=2)
    dense_values = torch.cat([unpack_value_groups(values, kv.group_idx, shape.groups), kv.tail_values], dim=2)
    (expected,) = torch.autograd.grad(_dense_attention(query, dense_keys, dense_values, scaling).sum(), query)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
