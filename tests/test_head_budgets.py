"""Per-head budgets: the KV heads of a layer keep different numbers of tokens, in real bytes.

With `head_budgets="adaptive"` the packed tokens of all heads share one row per sequence
(`[B, 1, Ts, ...]`), each naming its head. Checked: flattening keeps every head's tokens
(plain and quantized); attention over a shared row equals attention of each head over its own
tokens; heads whose attention is spread keep more tokens than heads that attend to a few,
each above its floor; the budget holds through decoding with bytes matching the accounting.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.allocation import HEAD_FLOOR, floor_heads, select_tokens
from hf_subtok.attention import subtok_attention
from hf_subtok.kernels import packed_attention, packed_attention_reference
from hf_subtok.quant import quantize, quantize_channels
from hf_subtok.storage.tensors import flatten_heads
from tests.kernel_cases import DEVICE, shared_row
from tests.tiny_models import decode_within_budget, make_tiny_model, random_prompts

triton_only = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def test_flatten_heads_keeps_every_heads_tokens_in_order():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 5, 16, generator=generator)
    values = torch.randn(2, 3, 4, 5, 8, generator=generator)  # [B, Hkv, K, T, C]
    flat_keys, flat_values = flatten_heads(keys, 2), flatten_heads(values, 3)
    assert flat_keys.shape == (2, 1, 15, 16) and flat_values.shape == (2, 1, 4, 15, 8)
    for head in range(3):
        rows = slice(5 * head, 5 * head + 5)
        assert torch.equal(flat_keys[:, 0, rows], keys[:, head])
        assert torch.equal(flat_values[:, 0, :, rows], values[:, head])
    quantized = quantize(values, 4, 8)
    torch.testing.assert_close(
        flatten_heads(quantized, 3).dequantize(torch.float32)[:, 0, :, 10:15],
        quantized.dequantize(torch.float32)[:, 2],
    )
    per_channel = quantize_channels(keys, 2, 2)  # tables per head, renumbered when flattened
    flat = flatten_heads(per_channel, 2)
    assert flat.scale.shape == (2, 1, 3 * per_channel.scale.shape[-2], 16)
    torch.testing.assert_close(flat.dequantize(torch.float32)[:, 0, 5:10], per_channel.dequantize(torch.float32)[:, 1])


@pytest.mark.parametrize("wide", [0, 7], ids=["narrow", "wide"])
@pytest.mark.parametrize("bits", [None, 4], ids=["plain", "4bit"])
def test_attention_over_a_shared_row_is_each_heads_attention_over_its_tokens(bits, wide):
    query, kv, per_head = shared_row([9, 2, 20], bits, wide)
    out, mass = packed_attention_reference.packed_attention(query, kv, return_mass=True)
    assert mass.shape == (1, 3, 31)
    for head, (keys, values) in enumerate(per_head):
        q = query[0, 2 * head : 2 * head + 2, 0]  # [R, D]
        probs = (q @ keys.T * keys.shape[-1] ** -0.5).softmax(-1)  # [R, T_h]
        torch.testing.assert_close(out[0, 2 * head : 2 * head + 2, 0], probs @ values, atol=2e-5, rtol=1e-4)
        own = kv.stored_valid[0, head]
        torch.testing.assert_close(mass[0, head, own], probs.mean(0), atol=1e-6, rtol=1e-5)
        assert (mass[0, head, ~own] == 0).all(), "a head attends only its own tokens"


def test_shared_rows_need_ownership_and_the_reference():
    query, kv, _ = shared_row([3, 4])
    with pytest.raises(ValueError, match="must say which tokens each head owns"):
        packed_attention(query, dataclasses.replace(kv, stored_valid=None), backend="torch")


@triton_only
@pytest.mark.parametrize("wide", [0, 7], ids=["narrow", "wide"])
@pytest.mark.parametrize("bits", [None, 4], ids=["plain", "4bit"])
def test_triton_reads_shared_rows_as_the_reference_does(bits, wide):
    query, kv, _ = shared_row([9, 2, 20], bits, wide, seed=3)
    tail_keys, tail_values = torch.randn(2, 1, 3, 5, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    kv = dataclasses.replace(kv, tail_keys=tail_keys, tail_values=tail_values)
    want = packed_attention_reference.packed_attention(query, kv)
    torch.testing.assert_close(packed_attention(query, kv, backend="triton"), want, atol=2e-5, rtol=1e-4)


def test_floor_heads_gives_each_head_its_floor():
    heads = torch.tensor([[[0] * 20 + [1] * 10]], dtype=torch.uint8)
    scores = torch.cat([torch.linspace(1.0, 0.5, 20), torch.linspace(0.01, 0.001, 10)]).view(1, 1, 30)
    keep = 16
    assert (heads.gather(2, select_tokens(scores, keep)) == 1).sum() == 0, "by score alone head 1 starves"
    chosen = heads.gather(2, select_tokens(floor_heads(scores, heads, 2, keep), keep))
    floor = int(HEAD_FLOOR * keep / 2)
    assert floor == 2 and (chosen == 1).sum() == floor and (chosen == 0).sum() == keep - floor
    assert torch.equal(floor_heads(scores, heads, 2, 4), scores), "no floor below one token"


def test_spread_heads_keep_more_tokens_than_focused_ones():
    """Head 0's queries all aim at one token, head 1's see no key (uniform attention): head 1
    keeps more tokens, head 0 at least its floor."""
    model = make_tiny_model("llama", num_hidden_layers=1)
    config = SubTokenConfig(
        budget=0.3, num_groups=2, window=8, pack_chunk=4, head_budgets="adaptive", floor_tokens=0, recipe=None
    )  # at 30% of 300 tokens the floor would set the bytes
    cache = SubTokenCache(model, config)
    layer, attention = cache.layers[0], model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 1, 2, 300, 16, generator=generator)
    queries = torch.zeros(1, 4, 32, 16)  # [B, Hq, W, D]: query heads 0-1 read KV head 0
    queries[:, :2] = 40 * keys[:, 0, 100] / keys[:, 0, 100].norm()
    with torch.no_grad():
        view, _ = layer.update(keys, values)
        subtok_attention(attention, queries, view, view, None, scaling=0.25)
        for _ in range(20):
            k, v = torch.randn(2, 1, 2, 1, 16, generator=generator)
            view, _ = layer.update(k, v)
            subtok_attention(attention, queries[:, :, :1], view, view, None, scaling=0.25)
    counts = [int((layer.stored_heads[0, 0] == h).sum()) for h in range(2)]
    total = layer.packed_keys.shape[-2]
    assert counts[1] > counts[0] >= int(HEAD_FLOOR * total / 2), counts
    stored_keys = layer.packed_keys[0, 0][layer.stored_heads[0, 0] == 0]
    assert (stored_keys == keys[0, 0, 100]).all(-1).any(), "the token head 0 attends to survives"


def test_decode_attention_adds_to_each_tokens_own_head():
    """While decoding, a stored token's score grows by the attention its own head gave it."""
    model = make_tiny_model("llama", num_hidden_layers=1)
    config = SubTokenConfig(
        budget=0.3, num_groups=2, window=8, pack_chunk=4, head_budgets="adaptive", floor_tokens=0, recipe=None
    )  # the 120-token prompt is packed, not held dense below the floor
    cache = SubTokenCache(model, config)
    layer, attention = cache.layers[0], model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 1, 2, 120, 16, generator=generator)
    checked = 0
    with torch.no_grad():
        view, _ = layer.update(keys, values)
        subtok_attention(attention, torch.randn(1, 4, 32, 16, generator=generator), view, view, None, scaling=0.25)
        for _ in range(12):
            before, heads = layer.token_scores.clone(), layer.stored_heads.clone()
            k, v = torch.randn(2, 1, 2, 1, 16, generator=generator)
            query = torch.randn(1, 4, 1, 16, generator=generator)
            view, _ = layer.update(k, v)
            _, mass = packed_attention_reference.packed_attention(query, view, None, 0.25, return_mass=True)
            subtok_attention(attention, query, view, view, None, scaling=0.25)
            if layer.token_scores.shape == before.shape and torch.equal(layer.stored_heads, heads):  # no pack
                stored = before.shape[-1]
                own = mass[..., :stored].gather(1, heads.long())  # [B, 1, Ts]
                torch.testing.assert_close(layer.token_scores - before, own)
                assert not torch.allclose(own, mass[:, :1, :stored]), "heads' masses should differ"
                checked += 1
    assert checked, "no decode step without a pack was observed"


@pytest.mark.parametrize(
    "extra",
    [{"bits": None}, {"bits": 4}, {"bits": 2, "rotate": True}, {"span": "adaptive", "router": "attention_value"}],
    ids=["plain", "4bit", "2bit-rotated", "adaptive-span"],
)
@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1])
def test_cache_with_head_budgets_stays_within_budget(budget, extra):
    config = SubTokenConfig(
        budget=budget, num_groups=4, window=16, pack_chunk=8, head_budgets="adaptive", floor_tokens=0, **extra, recipe=None
    )  # the budget, not the short-context floor, sets the bytes of this 400-token context
    cache = decode_within_budget(make_tiny_model("qwen2"), config, prompt_tokens=400)
    report = cache.memory_report()
    for layer, summary in zip(cache.layers, report["per_layer"], strict=True):
        assert len(layer.row_layers()) == 2  # the batch is stored row by row
        per_row = []
        for row in layer.row_layers():
            assert row.packed_keys.shape[:2] == (1, 1) and row.stored_heads.shape == row.token_scores.shape
            counts = [int((row.stored_heads[0, 0] == h).sum()) for h in range(row.num_heads)]
            assert row.tokens_per_head() == counts
            assert min(counts) >= int(HEAD_FLOOR * sum(counts) / row.num_heads)
            per_row.append(counts)
        assert summary["tokens_per_head"] == per_row[0]  # the report describes the first row


def test_shared_row_prompt_is_quantized_per_head_in_full_blocks():
    """Per-channel keys of a shared row: each head's survivors are quantized together (full
    blocks), so a shared row keeps about as many tokens as a row per head at the same bytes."""
    kept = {}
    for head_budgets in ("uniform", "adaptive"):
        model = make_tiny_model("qwen2")
        config = SubTokenConfig(
            budget=0.1, num_groups=2, window=16, bits=2, head_budgets=head_budgets, floor_tokens=0, recipe=None
        )  # at 10% of 600 tokens the floor would set the bytes
        cache = SubTokenCache(model, config)
        with torch.no_grad():
            model(input_ids=random_prompts(1, 600), past_key_values=cache)
        kept[head_budgets] = sum(sum(layer.tokens_per_head()) for layer in cache.layers)
        assert cache.memory_report()["ratio"] <= 0.1 * 1.01
    assert kept["adaptive"] >= 0.9 * kept["uniform"], kept  # (one head byte per token; 0.82 when quantized before selection)


def test_generation_with_head_budgets_runs_and_stays_within_budget():
    model = make_tiny_model("qwen2")
    config = SubTokenConfig(budget=0.3, num_groups=2, window=16, head_budgets="adaptive", floor_tokens=0, recipe=None)
    cache = SubTokenCache(model, config)  # no floor: the budget sets the bytes of these 200-token rows
    ids = random_prompts(2, 200)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=40, do_sample=False)
    assert out.shape == (2, 240)
    assert cache.memory_report()["ratio"] <= 0.3 * 1.01


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"head_budgets": "per-head", "budget": 0.25}, "head_budgets must be one of"),
        ({"head_budgets": "adaptive"}, "head_budgets='adaptive' needs budget="),
        ({"head_budgets": "adaptive", "budget": 0.8, "axes": "groups"}, "head_budgets='adaptive' needs"),
    ],
    ids=["unknown", "no-budget", "groups-only"],
)
def test_bad_head_budget_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubTokenConfig(**kwargs)
