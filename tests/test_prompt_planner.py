"""Cross-layer budgets: bytes go to layers whose attention is spread, within floors and total."""

from __future__ import annotations

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.allocation import LayerEvidence, StorageChoice, split_layer_budgets
from hf_subtok.formats import StorageFormat
from tests.tiny_models import make_tiny_model, random_prompts

FORMAT = StorageFormat(head_dim=16, num_groups=4, elem_bytes=4)
GROUPS = 4


def _evidence(scores: torch.Tensor) -> LayerEvidence:
    tokens = scores.shape[-1]
    group_scores = torch.ones(1, 1, tokens, GROUPS)
    return LayerEvidence(scores.view(1, 1, tokens), group_scores, [StorageChoice(FORMAT)], [1, 2, 3, 4])


def test_spread_attention_gets_more_bytes_than_concentrated():
    concentrated = torch.full((100,), 1e-4)
    concentrated[7] = 1.0
    spread = torch.full((100,), 0.01)
    total = 2 * 30 * FORMAT.token_bytes(4, scored=True)
    split = split_layer_budgets([_evidence(concentrated), _evidence(spread)], total, [0.0, 0.0])
    assert sum(split) == pytest.approx(total)
    assert split[1] > 3 * split[0]


def test_floors_are_honoured():
    concentrated = torch.zeros(100)
    concentrated[0] = 1.0
    spread = torch.full((100,), 0.01)
    total = 10_000.0
    split = split_layer_budgets([_evidence(concentrated), _evidence(spread)], total, [2_500.0, 0.0])
    assert split[0] >= 2_500.0
    assert sum(split) == pytest.approx(total)


def test_floors_above_the_total_are_refused():
    with pytest.raises(ValueError, match="layer floors need"):
        split_layer_budgets([_evidence(torch.ones(10))] * 2, 100.0, [60.0, 60.0])


def test_adaptive_cache_moves_bytes_between_layers_within_the_budget():
    model = make_tiny_model("llama", num_hidden_layers=4)
    ids = random_prompts(1, 400)
    reports = {}
    for mode in ("uniform", "adaptive"):
        # no floor: at 20% of 400 tokens it would set the bytes of every layer
        cache = SubTokenCache(model, SubTokenConfig(budget=0.2, window=16, layer_budgets=mode, floor_tokens=0, recipe=None))
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache)
        reports[mode] = cache.memory_report()
    uniform = [layer["ratio"] for layer in reports["uniform"]["per_layer"]]
    adaptive = [layer["ratio"] for layer in reports["adaptive"]["per_layer"]]
    assert max(uniform) - min(uniform) < 0.01
    assert max(adaptive) - min(adaptive) > 0.02, "the split should follow the layers' attention"
    assert min(adaptive) >= 0.2 * 0.25 * 0.9, "no layer below its floor"
    assert reports["adaptive"]["ratio"] <= 0.2 * 1.01
    assert reports["adaptive"]["ratio"] >= 0.2 * 0.9


def test_planner_hands_the_split_back_without_calling_into_layers():
    from hf_subtok.allocation.planner import PromptPlanner

    planner = PromptPlanner(expected=2)
    concentrated = torch.full((100,), 1e-4)
    concentrated[7] = 1.0
    own = 30 * FORMAT.token_bytes(4, scored=True)
    assert planner.submit("layer 0", own, _evidence(concentrated)) == []  # keys: anything
    shares = planner.submit("layer 1", own, _evidence(torch.full((100,), 0.01)))
    assert [key for key, _ in shares] == ["layer 0", "layer 1"]
    assert sum(row_bytes for _, row_bytes in shares) == pytest.approx(2 * own)
    assert shares[1][1] > shares[0][1] and planner.flush() == []
