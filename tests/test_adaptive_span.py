"""Adaptive span: a variable number of value groups per token, and the query-aware group scorer.

A layer keeping K < G groups also stores the other groups of its W widest tokens. Checked:
the other groups are the complement of the packed ones; attention reads them (reference and
Triton under the interpreter) exactly as attention over the values it stores; caches with
`span="adaptive"` stay within budget while measured bytes match the accounting; the plan widens
where attention is concentrated; the tokens that get the attention keep every group.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.allocation import StorageChoice, plan_layer
from hf_subtok.allocation.select import wide_first
from hf_subtok.attention import subtok_attention
from hf_subtok.formats import StorageFormat
from hf_subtok.kernels import packed_attention, packed_attention_lse
from hf_subtok.kernels.pack_reference import unpack_value_groups
from hf_subtok.scorers import get_group_scorer
from hf_subtok.storage.wide import WideGroups, other_groups
from tests.kernel_cases import DEVICE, DTYPES, TOLERANCE, Shape, with_wide_tokens
from tests.tiny_models import decode_within_budget, make_tiny_model, random_prompts

triton_only = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def test_other_groups_are_the_complement_in_ascending_order():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, 3, 7, 32, generator=generator)
    base = torch.rand(2, 3, 7, 8, generator=generator).topk(3, dim=-1).indices  # [B, Hkv, T, K], any order
    group_idx = base.permute(0, 1, 3, 2).to(torch.uint8)  # [B, Hkv, K, T]
    other, other_idx = other_groups(values, group_idx, 8)
    assert other.shape == (2, 3, 5, 7, 4) and other_idx.shape == (2, 3, 5, 7)
    assert (other_idx[:, :, 1:] > other_idx[:, :, :-1]).all(), "slots must ascend"
    every = torch.cat([group_idx, other_idx], dim=2).long().sort(dim=2).values
    assert torch.equal(every, torch.arange(8).view(1, 1, 8, 1).expand(2, 3, 8, 7))
    grouped = values.view(2, 3, 7, 8, 4)
    for slot in range(5):
        want = grouped.gather(3, other_idx[:, :, slot].long().view(2, 3, 7, 1, 1).expand(-1, -1, -1, 1, 4))
        torch.testing.assert_close(other[:, :, slot], want.squeeze(3), rtol=0, atol=0)


def _attention(query, keys, values, valid=None, scale=None):
    """Plain softmax attention `[B, Hq, 1, D]` over `[B, Hkv, T, D]` (GQA by repetition)."""
    group = query.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1)
    v = values.float().repeat_interleave(group, dim=1)
    scores = query.float() @ k.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scale is None else scale)
    if valid is not None:
        scores = scores.masked_fill(~valid.repeat_interleave(group, dim=1).unsqueeze(2), float("-inf"))
    return scores.softmax(-1) @ v


SHAPES = [
    Shape(stored=70, tail=9, head_dim=64, group=3, keep=3, groups=8),
    Shape(stored=33, tail=0, head_dim=128, group=1, keep=1, groups=4),  # empty tail, K = 1
    Shape(stored=9, tail=4, head_dim=64, group=8, keep=1, groups=2, kv_heads=1),
]
WIDE = {"none": 0, "one": 1, "some": 5, "all": None}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
@pytest.mark.parametrize("bits", [None, 4], ids=["plain", "4bit"])
@pytest.mark.parametrize("wide", WIDE.values(), ids=WIDE.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_attention_reads_the_other_groups_of_wide_tokens(shape, wide, bits, backend):
    wide = shape.stored if wide is None else wide
    query, kv, keys, seen = with_wide_tokens(shape, torch.float32, wide, bits, seed=wide)
    got = packed_attention(query, kv, backend=backend)
    want = _attention(query, keys, seen)
    torch.testing.assert_close(got.float(), want, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_wide_tokens_with_tokens_selected_per_head(dtype, backend):
    """Fillers among the packed tokens (`stored_valid`), a mask over the tail, the lse output."""
    shape = Shape(stored=40, tail=6, head_dim=64, group=2, keep=2, groups=4)
    query, kv, keys, seen = with_wide_tokens(shape, dtype, 12, bits=4, seed=3)
    valid = torch.rand(2, 2, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.3
    kv = dataclasses.replace(kv, stored_valid=valid)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool, device=DEVICE)
    out, lse = packed_attention_lse(query, kv, mask, backend=backend)
    every = torch.cat([valid, torch.ones(2, 2, 6, dtype=torch.bool, device=DEVICE)], dim=-1)
    torch.testing.assert_close(out, _attention(query, keys, seen, every), **TOLERANCE[dtype])
    assert lse.shape == (2, 4, 1) and lse.isfinite().all()


def test_wide_inputs_are_checked():
    shape = SHAPES[0]
    query, kv, _, _ = with_wide_tokens(shape, torch.float32, 5)
    with pytest.raises(ValueError, match="given together"):
        packed_attention(query, dataclasses.replace(kv, wide_group_idx=None), backend="torch")
    with pytest.raises(ValueError, match="wide_group_idx must be uint8"):
        packed_attention(query, dataclasses.replace(kv, wide_group_idx=kv.wide_group_idx.long()), backend="torch")
    too_many = kv.values.new_zeros(2, 2, 5, shape.stored + 1, 8)
    with pytest.raises(ValueError, match="wide_values must be"):
        bad = dataclasses.replace(kv, wide_values=too_many, wide_group_idx=torch.zeros(2, 2, 5, shape.stored + 1, dtype=torch.uint8))
        packed_attention(query, bad, backend="torch")


def test_wide_first_puts_the_widest_first_and_never_repicks():
    scores = torch.tensor([[[0.5, 0.1, float("-inf"), 0.3, 0.2]]])
    worth = torch.tensor([[[0.1, 0.9, float("-inf"), float("-inf"), 0.05]]])
    index = wide_first(scores, worth, keep=4, wide=2)
    assert index.tolist() == [[[0, 1, 3, 4]]]
    # more kept than finite tokens outside the wide ones: fillers, never a wide token again
    index = wide_first(scores, worth, keep=5, wide=2)
    assert sorted(index[0, 0, 2:].tolist()) == [2, 3, 4]


def test_a_narrow_token_cannot_be_widened():
    held = WideGroups.of_stored(torch.zeros(1, 1, 1, 1, 4), torch.zeros(1, 1, 1, 1, dtype=torch.uint8),
                                torch.ones(1, 1, 1, dtype=torch.float16), tokens=3)
    assert held.worth(torch.ones(1, 1, 3))[0, 0].isinf().tolist() == [False, True, True]
    with pytest.raises(ValueError, match="cannot be widened"):
        held.take(torch.tensor([[[1]]]), tokens=2)


# --- the query-aware group scorer ---


def test_attention_value_scores_pairs_by_contribution():
    scorer = get_group_scorer("attention_value")
    values = torch.zeros(1, 1, 2, 8)
    values[0, 0, 0] = torch.tensor([3.0, 4.0, 0, 0, 0, 0, 1.0, 0])  # group 0 carries the most
    values[0, 0, 1] = torch.tensor([0, 0, 0, 0, 0, 10.0, 0, 0])
    weights = torch.tensor([[[0.9, 0.01]]])
    scores = scorer.score_groups(None, values, 4, token_weights=weights)
    assert scores.shape == (1, 1, 2, 4)
    assert scores[0, 0, 0].argmax() == 0, "the group carrying the largest contribution ranks first"
    # across tokens: token 0's group 0 (0.9 x 5) outranks token 1's larger group (0.01 x 10)
    assert scores[0, 0, 0, 0] > scores[0, 0, 1, 2]
    unweighted = get_group_scorer("value_norm").score_groups(None, values, 4)
    assert unweighted[0, 0, 1, 2] > unweighted[0, 0, 0, 0]
    # no evidence: the value norm; a token no query saw still ranks its own groups
    torch.testing.assert_close(scorer.score_groups(None, values, 4), unweighted)
    unseen = scorer.score_groups(None, values, 4, token_weights=torch.zeros(1, 1, 2))
    assert unseen[0, 0, 1].argmax() == 2
    with pytest.raises(ValueError, match="token_weights must be"):
        scorer.score_groups(None, values, 4, token_weights=torch.ones(1, 2))


# --- the plan and the cache ---

FORMAT = StorageFormat(head_dim=64, num_groups=4, elem_bytes=4)


def _concentrated(tokens: int = 400, heavy: int = 20):
    """Scores of tokens whose value energy sits in one group, except the `heavy` tokens that
    get most of the attention, whose energy is spread over every group."""
    generator = torch.Generator().manual_seed(0)
    token_scores = torch.rand(1, 2, tokens, generator=generator) * 1e-3
    token_scores[..., :heavy] = 1.0
    group_scores = torch.full((1, 2, tokens, 4), 0.01)
    group_scores[..., 0] = 1.0
    group_scores[:, :, :heavy] = 1.0
    return token_scores, group_scores


def test_plan_widens_the_tokens_that_get_the_attention():
    token_scores, group_scores = _concentrated()
    budget = 0.2 * 400 * FORMAT.dense_token_bytes
    fixed = plan_layer(token_scores, group_scores, budget, choices=[StorageChoice(FORMAT)], candidate_groups=[1, 2, 3, 4])
    adaptive = plan_layer(
        token_scores, group_scores, budget, choices=[StorageChoice(FORMAT)], candidate_groups=[1, 2, 3, 4],
        wide_fractions=(0.125, 0.25, 0.5),
    )
    assert fixed.wide_fraction == 0.0
    assert adaptive.keep_groups == 1 and adaptive.wide_fraction > 0
    cost = FORMAT.token_bytes(1, scored=True) + adaptive.wide_fraction * FORMAT.wide_bytes(1)
    assert adaptive.keep_tokens == int(budget // cost)
    # uniform attention and energy in one group: widening buys nothing, no bytes go to it
    flat = plan_layer(
        torch.ones(1, 2, 400), torch.full((1, 2, 400, 4), 0.0).index_fill(-1, torch.tensor([0]), 1.0),
        budget, choices=[StorageChoice(FORMAT)], candidate_groups=[1, 2, 3, 4], wide_fractions=(0.125, 0.5),
    )
    assert flat.wide_fraction == 0.0


@pytest.mark.parametrize("bits", [None, 4, 2], ids=["plain", "4bit", "2bit"])
@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1])
def test_adaptive_cache_stays_within_budget_and_bytes_match(budget, bits):
    config = SubTokenConfig(
        budget=budget, num_groups=4, window=16, pack_chunk=8, span="adaptive", router="attention_value", bits=bits,
        floor_tokens=0, recipe=None,  # the budget, not the short-context floor, sets the bytes of this 300-token context
    )
    cache = decode_within_budget(make_tiny_model("qwen2"), config, prompt_tokens=300)
    report = cache.memory_report()
    for layer in cache.layers:
        assert len(layer.row_layers()) == 2  # the batch is stored row by row, each [1, Hkv, ...]
        for row in layer.row_layers():
            if row.wide_norms is None:
                continue
            wide = row.wide_norms.shape[-1]
            measured = sum(
                t.numel() * t.element_size() for name, t in row.stored_tensors().items() if name.startswith("wide_")
            )
            assert measured == 2 * wide * row.storage.wide_bytes(row.keep_groups)  # Hkv=2 rows
    assert [summary["wide_tokens"] for summary in report["per_layer"]] == [  # of the first batch row
        0 if layer.row_layers()[0].wide_norms is None else layer.row_layers()[0].wide_norms.shape[-1] for layer in cache.layers
    ]


def test_wide_tokens_are_the_ones_attention_needs():
    """The token every query attends to keeps every group through prefill and decode packs
    (the attention path: SnapKV's observed mass, then the mass each decode step reports); the
    value groups of a wide token are stored exactly."""
    model = make_tiny_model("llama", num_hidden_layers=1)
    config = SubTokenConfig(  # no floor: at 35% of 200 tokens it would set the bytes
        budget=0.35, num_groups=4, window=8, pack_chunk=4, span="adaptive", router="attention_value", floor_tokens=0, recipe=None
    )
    cache = SubTokenCache(model, config)
    layer, attention = cache.layers[0], model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 1, 2, 200, 16, generator=generator)
    values[..., 4:] *= 0.01  # energy in group 0: K = 1 keeps most of it...
    values[:, :, 77] = torch.randn(1, 2, 16, generator=generator)  # ...except for token 77
    target = keys[:, :, 77] / keys[:, :, 77].norm(dim=-1, keepdim=True) * 4  # [B, Hkv, D]
    keys[:, :, 77] = target

    def queries(count: int) -> torch.Tensor:  # [B, Hq=4, count, D], each aimed at token 77
        return 3 * target.repeat_interleave(2, dim=1).unsqueeze(2).expand(-1, -1, count, -1)

    with torch.no_grad():
        view, _ = layer.update(keys, values)
        subtok_attention(attention, queries(32), view, view, None, scaling=0.25)
        assert layer.keep_groups < 4 and layer.wide_fraction > 0, "the plan should widen"
        for _ in range(30):
            k, v = torch.randn(2, 1, 2, 1, 16, generator=generator)
            view, _ = layer.update(k, v)
            subtok_attention(attention, queries(1), view, view, None, scaling=0.25)
    wide = layer.wide_norms.shape[-1]
    assert 0 < wide < layer.packed_keys.shape[-2]
    for head in range(2):
        stored_keys = layer.packed_keys[0, head]  # [Ts, D]
        at = (stored_keys == keys[0, head, 77]).all(-1).nonzero().flatten().tolist()
        assert at and at[0] < wide, f"head {head}: token 77 must be wide"
        slot = slice(at[0], at[0] + 1)
        groups = {int(g) for g in layer.group_idx[0, head, :, slot].flatten()}
        groups |= {int(g) for g in layer.wide_idx[0, head, :, slot].flatten()}
        assert groups == {0, 1, 2, 3}
        base = unpack_value_groups(layer.packed_values[..., slot, :], layer.group_idx[..., slot], 4)
        extra = unpack_value_groups(layer.wide_values[..., slot, :], layer.wide_idx[..., slot], 4)
        torch.testing.assert_close((base + extra)[0, head, 0], values[0, head, 77], rtol=0, atol=0)


def test_fixed_span_stores_no_wide_tokens():
    model = make_tiny_model("qwen2")
    config = SubTokenConfig(budget=0.25, num_groups=4, window=16, router="attention_value", floor_tokens=0, recipe=None)
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(1, 200), past_key_values=cache)
    assert all(layer.wide_values is None for layer in cache.layers)
    assert not any(name.startswith("wide_") for layer in cache.layers for name in layer.stored_tensors())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"span": "ragged", "budget": 0.25}, "span must be one of"),
        ({"span": "adaptive"}, "span='adaptive' needs budget="),
        ({"span": "adaptive", "budget": 0.25, "axes": "tokens"}, "span='adaptive' needs"),
        ({"span": "adaptive", "budget": 0.25, "num_groups": 1}, "num_groups >= 2"),
    ],
    ids=["unknown", "no-budget", "tokens-only", "one-group"],
)
def test_bad_span_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubTokenConfig(**kwargs)
