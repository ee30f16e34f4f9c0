"""Token eviction under one byte budget: budgets hold, the right tokens survive."""

from __future__ import annotations

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.allocation import StorageChoice, plan_layer
from hf_subtok.attention import subtok_attention
from hf_subtok.formats import StorageFormat
from hf_subtok.scorers import Observation, get_token_scorer
from hf_subtok.storage.rollback import _CROP_TAKES_LENGTH
from tests.tiny_models import make_tiny_model, random_prompts

FORMAT = StorageFormat(head_dim=64, num_groups=8, elem_bytes=4)
BUDGETS = [0.75, 0.5, 0.375, 0.25, 0.125, 0.06]


@pytest.mark.parametrize(
    "dtype, layer_budgets",
    [(torch.float32, "uniform"), (torch.bfloat16, "uniform"), (torch.float32, "adaptive")],
    ids=["fp32", "bf16", "fp32-adaptive"],
)
@pytest.mark.parametrize("axes", ["both", "tokens"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_ratio_never_exceeds_budget(budget, axes, dtype, layer_budgets):
    model = make_tiny_model("qwen2", dtype=dtype)
    # the budget, not the short-context floor, sets the bytes of this 400-token context
    config = SubTokenConfig(
        budget=budget, axes=axes, window=16, pack_chunk=8, layer_budgets=layer_budgets, floor_tokens=0, recipe=None
    )
    cache = SubTokenCache(model, config)
    ids = random_prompts(2, 400)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
        ratios = [cache.memory_report()["ratio"]]
        for step in range(24):
            model(input_ids=random_prompts(2, 1, seed=step), past_key_values=cache)
            ratios.append(cache.memory_report()["ratio"])
    report = cache.memory_report()
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.stored_tensors().values())
    assert report["stored_bytes"] == held
    assert max(ratios) <= budget * 1.01
    assert max(ratios) >= budget * 0.8, "the budget should be spent, not wasted"


LAYOUTS = {
    "rows-per-head": {},
    "adaptive-span": {"span": "adaptive", "router": "attention_value", "num_groups": 4},
    "shared-rows": {"head_budgets": "adaptive"},
    "shared-rows-span": {"head_budgets": "adaptive", "span": "adaptive", "router": "attention_value", "num_groups": 4},
    "shared-rows-2bit": {"head_budgets": "adaptive", "num_groups": 4, "bits": 2},
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_ten_thousand_decode_positions_stay_within_budget(layout):
    """10,000 positions after a 64-token prompt through the layer and the registered attention
    function stay within the budget after every call (so at every pack). The positions come
    `pack_chunk` at a time with one query each (the bound depends on what is stored, not on how
    many queries scored it), so every call packs: as many packs as one position per call makes,
    at a 16th of the calls and attention work. The last `pack_chunk` positions come one per
    call, as `generate` feeds them."""
    model = make_tiny_model("llama", num_hidden_layers=1)
    config = SubTokenConfig(budget=0.25, window=32, pack_chunk=16, token_scorer="key_norm", **layout, recipe=None)
    cache = SubTokenCache(model, config)
    layer = cache.layers[0]
    attention = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 1, 2, 64, 16, generator=generator)
    chunk, floor = config.pack_chunk, getattr(config, "floor_tokens", 0)
    steps = [chunk] * (10_000 // chunk - 1) + [1] * chunk
    packs = 0
    with torch.no_grad():
        layer.update(keys, values)
        layer._flush()
        for tokens in steps:
            k, v = torch.randn(2, 1, 2, tokens, 16, generator=generator)  # [B, Hkv, T, D]
            q = torch.randn(1, 4, 1, 16, generator=generator)  # [B, H, 1, D]
            behind = layer.packed_positions
            k_view, v_view = layer.update(k, v)
            subtok_attention(attention, q, k_view, v_view, None, scaling=0.25)
            packs += layer.packed_positions > behind
            seen, ratio = cache.get_seq_length(), cache.memory_report()["ratio"]
            if seen <= floor:  # short contexts are kept exactly (tests/test_bytes_held.py)
                continue
            # above the floor a layer may hold max(budget, floor_tokens dense tokens) of the bytes
            assert ratio <= max(0.25, floor / seen) * 1.01, (seen, ratio)
            assert layer.window_keys.shape[-2] <= 32, (seen, layer.window_keys.shape)
    assert cache.get_seq_length() == 10_064
    assert packs >= (10_000 - floor) // chunk - 1, "every chunk of positions packs, as one position per call would"


def test_snapkv_keeps_the_token_the_queries_look_at():
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 300, 16)
    queries = torch.randn(1, 4, 8, 16)
    keys[0, 0, 123] = queries[0, :2].mean(dim=(0, 1)) * 6  # head 0's queries all point at token 123
    scores = get_token_scorer("snapkv").score_tokens(keys, keys, Observation(queries, None, 0.25))
    assert scores.shape == (1, 2, 300)
    finite = scores[0, 0, 4:-8]
    assert finite[119] == finite.max()
    assert finite[119] > 5 * finite[:96].median(), "pooling spreads the peak to neighbours only"
    assert (scores[..., -8:] >= 2.0).all(), "the observation window ranks above every other token"


def test_overwhelming_token_survives_a_tiny_budget_in_the_model():
    """A token whose key dominates the attention of the last queries is never evicted."""
    model = make_tiny_model("llama", num_hidden_layers=1)
    cache = SubTokenCache(model, SubTokenConfig(budget=0.06, window=8, obs_window=8, floor_tokens=0, recipe=None))
    layer = cache.layers[0]
    keys = torch.randn(1, 2, 400, 16)
    values = torch.randn(1, 2, 400, 16)
    queries = torch.randn(1, 4, 400, 16)
    keys[0, :, 77] = queries[0, :, -8:].reshape(2, 2 * 8, 16).mean(1) * 8
    view, _ = layer.update(keys, values)
    view.observer(Observation(queries[:, :, -8:], None, 0.25))
    kept = layer.packed_keys[0]
    for head in range(2):
        assert (kept[head] == keys[0, head, 77]).all(-1).any(), f"head {head} lost the attended token"


def test_plan_respects_budget_and_floor():
    token_scores = torch.rand(1, 2, 100)
    group_scores = torch.rand(1, 2, 100, 8)
    cost = FORMAT.token_bytes(2, scored=True)
    plan = plan_layer(token_scores, group_scores, 10 * cost, choices=[StorageChoice(FORMAT)], candidate_groups=[2])
    assert plan.keep_groups == 2 and plan.keep_tokens == 10
    plan = plan_layer(token_scores, group_scores, 10 * cost, choices=[StorageChoice(FORMAT)], candidate_groups=list(range(1, 9)))
    assert FORMAT.token_bytes(plan.keep_groups, scored=True) * plan.keep_tokens <= 10 * cost
    with pytest.raises(ValueError, match="less than 5 token"):
        plan_layer(token_scores, group_scores, 4 * cost, choices=[StorageChoice(FORMAT)], candidate_groups=[2], min_tokens=5)


def test_plan_prefers_groups_when_attention_is_spread_and_tokens_when_peaked():
    group_scores = torch.zeros(1, 1, 200, 8)
    group_scores[..., 0] = 1.0  # all value energy in one group: one group per token is enough
    spread = torch.full((1, 1, 200), 1.0 / 200)
    plan = plan_layer(spread, group_scores, 200 * 80, choices=[StorageChoice(FORMAT)], candidate_groups=list(range(1, 9)))
    assert plan.keep_groups == 1
    flat_groups = torch.ones(1, 1, 200, 8)  # energy spread over all groups
    peaked = torch.zeros(1, 1, 200)
    peaked[..., :10] = 0.1  # ten tokens hold all the attention
    plan = plan_layer(peaked, flat_groups, 200 * 80, choices=[StorageChoice(FORMAT)], candidate_groups=list(range(1, 9)))
    assert plan.keep_groups == 8 and plan.keep_tokens >= 10


def _padded_generation(new_tokens: int = 4):
    """A batch of 2 prompts of 60 and 10 real tokens (row 1 left-padded) generated greedily
    through a cache that evicts (`floor_tokens=0`: the budget applies to these short rows)."""
    model = make_tiny_model("llama")
    cache = SubTokenCache(model, SubTokenConfig(budget=0.5, window=4, pack_chunk=2, floor_tokens=0, recipe=None))
    ids = random_prompts(2, 60)
    mask = torch.ones_like(ids)
    mask[1, :50] = 0  # row 1 has 10 real tokens
    with torch.no_grad():
        model.generate(
            input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False
        )
    return cache, mask


def test_left_padding_is_never_stored_as_a_valid_token():
    """Each row holds its real tokens only: as many seen as the attention mask counts (plus the
    decoded ones), no more held (packed valid slots and window) than that."""
    new_tokens = 4
    cache, mask = _padded_generation(new_tokens)
    decoded = new_tokens - 1  # the last token generated is never fed back
    for layer in cache.layers:
        assert len(layer.row_layers()) == 2
        for r, row in enumerate(layer.row_layers()):
            real = int(mask[r].sum()) + decoded
            assert row.get_seq_length() == real, (r, row.get_seq_length(), real)
            assert row.window_keys.shape[0] == 1 and row.token_scores.shape[0] == 1
            held = row._valid_slots().sum(-1) + row.window_keys.shape[-2]  # [1, Hkv]
            assert (held <= real).all(), (r, held, real)
        assert layer.row_layers()[1].packed_keys.shape[-2] > 0, "the short row packs too (no floor)"
        assert layer.row_layers()[0]._valid_slots().all(), "row 0 has no padding: no filler slot"
        assert layer.get_seq_length() == mask.shape[1] + decoded


def test_rows_follow_a_batch_reorder():
    """A reorder moves each row with its tensors, so its valid slots (derived from them) too."""
    cache, mask = _padded_generation(new_tokens=4)
    layer = cache.layers[0]
    before = [row._valid_slots().clone() for row in layer.row_layers()]
    held = {name: t.clone() for name, t in layer.stored_tensors().items()}  # rows.{r}.{name}
    assert not torch.equal(before[0], before[1])
    cache.reorder_cache(torch.tensor([1, 0]))
    real = (mask.sum(-1) + 3).tolist()  # the real tokens of rows 0 and 1, and the 3 decoded
    assert [row.get_seq_length() for row in layer.row_layers()] == real[::-1]
    for r, source in enumerate([1, 0]):
        assert torch.equal(layer.row_layers()[r]._valid_slots(), before[source])
    after = layer.stored_tensors()
    assert after.keys() == held.keys()
    for name, tensor in after.items():
        r, part = name.split(".", 2)[1:]
        assert torch.equal(tensor, held[f"rows.{1 - int(r)}.{part}"]), name


def test_crop_is_refused_by_an_evicting_cache():
    """A layer that evicts cannot roll back: what it packed or evicted because of the cropped
    tokens is gone, so any crop (into evicted tokens or within the window) raises and leaves
    the cache as it was."""
    model = make_tiny_model("llama")
    cache = SubTokenCache(model, SubTokenConfig(budget=0.5, window=8, pack_chunk=4, floor_tokens=0, recipe=None))
    with torch.no_grad():
        model(input_ids=random_prompts(1, 100), past_key_values=cache)
    seen = cache.get_seq_length()
    held = {name: t.clone() for name, t in cache.layers[0].stored_tensors().items()}
    assert not any(layer.is_croppable for layer in cache.layers)
    for keep in (10, seen - 2):
        with pytest.raises(ValueError, match="cannot roll back"):
            cache.crop(keep if _CROP_TAKES_LENGTH else keep - seen)
    assert cache.get_seq_length() == seen
    after = cache.layers[0].stored_tensors()
    assert after.keys() == held.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in held.items())


def test_unknown_token_scorer_and_axes_are_refused():
    with pytest.raises(ValueError, match="token_scorer.*'oracle'"):
        SubTokenConfig(budget=0.5, token_scorer="oracle", recipe=None)
    with pytest.raises(ValueError, match="axes.*'heads'"):
        SubTokenConfig(budget=0.5, axes="heads", recipe=None)


def test_plans_keep_a_share_of_uniform_weight_for_unseen_queries():
    from hf_subtok.allocation import plan as allocation

    scores = torch.zeros(1, 1, 10)
    scores[..., 3] = 1.0
    weights = allocation._token_weights(scores)
    share = allocation.UNCERTAINTY
    assert 0 < share < 1
    assert weights[0, 0, 3].item() == pytest.approx(1 - share + share / 10)
    assert weights[0, 0, 0].item() == pytest.approx(share / 10)
    assert weights.sum().item() == pytest.approx(1.0)
