"""The attention mass from the Triton decode kernel (interpreted on a CPU) equals the reference's.

An evicting cache re-selects its tokens by the attention each one got, so the decode path with
`return_mass=True` must give the same mass on every layout: plain and quantized storage,
tokens selected per head with a tail mask, several token splits, wide tokens (adaptive span)
and rows shared by the KV heads (per-head budgets). `torch.empty` is NaN-filled so reads of
unwritten scores fail.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.kernels import packed_attention, packed_attention_reference
from tests.kernel_cases import (
    DEVICE,
    TOLERANCE,
    Shape,
    make_packed,
    quantize_packed,
    shared_row,
    with_wide_tokens,
)
from tests.tiny_models import make_tiny_model, random_prompts

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.usefixtures("nan_empty"),
]

SHAPE = Shape(stored=90, tail=7, head_dim=64, group=3, keep=3, groups=8)


def _per_head(kv, seed: int):
    generator = torch.Generator().manual_seed(seed)
    valid = torch.rand(*kv.keys.shape[:3], generator=generator).to(DEVICE) > 0.3
    return dataclasses.replace(kv, stored_valid=valid)


def _cases():
    query, kv, _, _ = make_packed(SHAPE, torch.float32, seed=1)
    yield "plain", query, kv, None
    quantized, _ = quantize_packed(kv, 4, 2)
    yield "k4v2", query, quantized, None
    mask = torch.ones(2, 1, 1, 20, dtype=torch.bool, device=DEVICE)
    mask[1, ..., -3] = False
    yield "per-head-masked", query, _per_head(quantized, 2), mask
    query, kv, _, _ = with_wide_tokens(Shape(stored=40, tail=5, head_dim=64, group=2, keep=2, groups=4), torch.float32, 9, bits=4)
    yield "wide", query, _per_head(kv, 3), None
    query, kv, _, _ = make_packed(Shape(stored=50, tail=4, head_dim=64, group=2, keep=4, groups=4), torch.float32, seed=7)
    implied = torch.arange(4, dtype=torch.uint8, device=DEVICE).view(1, 1, 4, 1).expand(2, 2, 4, 50)  # zero-stride
    yield "implied-indices", query, dataclasses.replace(quantize_packed(kv, 2, 4)[0], group_idx=implied), None
    query, kv, _ = shared_row([9, 2, 20], 4, 5, seed=4)
    tail_keys, tail_values = torch.randn(2, 1, 3, 6, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    yield "shared-row", query, dataclasses.replace(kv, tail_keys=tail_keys, tail_values=tail_values), None


CASES = list(_cases())


@pytest.mark.parametrize("name, query, kv, mask", CASES, ids=[c[0] for c in CASES])
def test_triton_mass_equals_reference(name, query, kv, mask):
    out, mass = packed_attention(query, kv, mask, scaling=0.2, backend="triton", return_mass=True)
    want_out, want_mass = packed_attention_reference.packed_attention(query, kv, mask, 0.2, return_mass=True)
    assert mass.shape == want_mass.shape == (query.shape[0], kv.kv_heads, kv.num_tokens)
    torch.testing.assert_close(out, want_out, **TOLERANCE[torch.float32])
    torch.testing.assert_close(mass, want_mass, atol=1e-6, rtol=1e-4)


def test_triton_scores_over_token_splits():
    from hf_subtok.kernels.packed_attention_triton import packed_decode_attention_triton

    query, kv, _, _ = make_packed(Shape(stored=200, tail=30, head_dim=64, group=3, keep=3, groups=8), torch.float32, seed=6)
    quantized, _ = quantize_packed(kv, 4, 4)
    _, lse, scores = packed_decode_attention_triton(query, quantized, split_tokens=64, return_scores=True)
    _, want_mass = packed_attention_reference.packed_attention(query, quantized, return_mass=True)
    mass = torch.exp(scores - lse).view(2, 2, 3, 230).mean(2)
    torch.testing.assert_close(mass, want_mass, atol=1e-6, rtol=1e-4)


def test_evicting_cache_decodes_through_the_kernel_with_the_same_tokens(monkeypatch):
    """An evicting cache (the attention mass re-selects tokens every pack) generates the same
    tokens whether the kernel or the reference computes its decode attention."""
    import hf_subtok.kernels as kernels

    launches = []
    launch = kernels._decode_triton
    monkeypatch.setattr(kernels, "_decode_triton", lambda *a, **k: launches.append(k) or launch(*a, **k))
    model = make_tiny_model("llama", num_hidden_layers=1).to(DEVICE)
    ids = random_prompts(1, 96).to(DEVICE)
    tokens = {}
    for backend in ("torch", "triton"):
        config = SubTokenConfig(budget=0.4, num_groups=4, window=8, pack_chunk=4, bits=4, backend=backend, floor_tokens=0, recipe=None)
        cache = SubTokenCache(model, config)
        tokens[backend] = model.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False)
        assert cache.memory_report()["ratio"] <= 0.4 * 1.01
    assert torch.equal(tokens["torch"], tokens["triton"])
    assert launches and all(k.get("with_scores") for k in launches), "decode steps must take the kernel"
