"""Per-layer overrides: another budget or scorer for a range of layers, and their errors."""

from __future__ import annotations

import pytest
import torch

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.config import LayerOverride
from tests.tiny_models import make_tiny_model, random_prompts


def _prefill(num_layers: int, config: SubTokenConfig) -> SubTokenCache:
    model = make_tiny_model("llama", num_hidden_layers=num_layers)
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(2, 300), past_key_values=cache)
    return cache


def test_budget_override_fixes_those_layers_and_the_rest_share_what_is_left():
    config = SubTokenConfig(
        budget=0.25,
        window=16,
        floor_tokens=0,  # the budget, not the short-context floor, sets every layer's bytes
        layer_budgets="uniform",
        overrides=[{"layers": "0-1", "budget": 0.4}], recipe=None,
    )
    cache = _prefill(4, config)
    report = cache.memory_report()
    ratios = [layer["ratio"] for layer in report["per_layer"]]
    assert ratios[0] == pytest.approx(0.4, abs=0.03) and ratios[1] == pytest.approx(0.4, abs=0.03)
    # layers 2-3 share what is left: (4 x 0.25 - 2 x 0.4) / 2 = 0.1 each
    assert ratios[2] == pytest.approx(0.1, abs=0.02) and ratios[3] == pytest.approx(0.1, abs=0.02)
    assert report["ratio"] <= 0.25 * 1.01


@pytest.mark.parametrize("layer_budgets", ["uniform", "adaptive"])
def test_budget_override_keeps_the_total_within_budget(layer_budgets):
    override = LayerOverride(first=3, last=3, budget=0.1)
    config = SubTokenConfig(
        budget=0.25, window=16, floor_tokens=0, layer_budgets=layer_budgets, overrides=[override], recipe=None
    )
    cache = _prefill(4, config)
    report = cache.memory_report()
    ratios = [layer["ratio"] for layer in report["per_layer"]]
    assert ratios[3] <= 0.1 * 1.01
    # the other layers get the bytes layer 3 gave up: 0.3 each, or 0.9 together when adaptive
    if layer_budgets == "uniform":
        assert ratios[:3] == pytest.approx([0.3] * 3, abs=0.02)
    assert sum(ratios[:3]) == pytest.approx(0.9, abs=0.05)
    assert report["ratio"] <= 0.25 * 1.01


def test_scorer_override_takes_effect_on_its_layers_only():
    config = SubTokenConfig(
        budget=0.3,
        floor_tokens=0,
        overrides=[{"layers": 1, "token_scorer": "streaming", "router": "value_norm"}], recipe=None,
    )
    model = make_tiny_model("llama", num_hidden_layers=3)
    cache = SubTokenCache(model, config)
    assert [layer.policy.token_scorer.name for layer in cache.layers] == ["snapkv", "streaming", "snapkv"]
    with torch.no_grad():
        model(input_ids=random_prompts(1, 200), past_key_values=cache)
    kept = [layer.token_scores for layer in cache.layers]
    # streaming keeps the sinks and the newest tokens: its stored positions are one recent run
    assert kept[1] is not None and cache.memory_report()["ratio"] <= 0.3 * 1.01


def test_later_override_wins():
    config = SubTokenConfig(
        budget=0.3,
        overrides=[
            {"layers": "0-2", "token_scorer": "key_norm"},
            {"layers": 2, "token_scorer": "streaming"},
        ], recipe=None,
    )
    settings = config.layer_settings(3)
    assert [s.token_scorer for s in settings] == ["key_norm", "key_norm", "streaming"]
    assert all(s.overrides == [] for s in settings)


def test_override_for_a_missing_layer_is_refused():
    model = make_tiny_model("llama", num_hidden_layers=2)
    with pytest.raises(
        ValueError, match=r"overrides\[0\]: names layers 2\.\.5, but the model has 2 layers"
    ):
        SubTokenCache(
            model, SubTokenConfig(budget=0.3, overrides=[{"layers": "2-5", "budget": 0.5}], recipe=None)
        )


@pytest.mark.parametrize(
    "overrides, match",
    [
        ([{"layers": "x"}], "layers must be 'N' or 'FIRST-LAST'"),
        ([{"layers": "3-1"}], "last must be >= 3"),
        ([{"layers": 0, "budget": 1.5}], "override budget must be in"),
        ([{"layers": 0, "token_scorer": "nope"}], "override token_scorer must be one of"),
        ([{"layers": 0, "colour": "red"}], r"unknown field\(s\) \['colour'\]"),
        ([3], "overrides items must be LayerOverride or dict"),
        ([{"layers": 0, "bits": 3}], r"override bits must be one of \(2, 4, 8\) or 'auto', got 3"),
        ([{"layers": 0, "bits": True}], "override bits must be one of"),
        ([{"layers": "25-0%", "bits": 4}], r"0 <= low < high <= 1, got '25-0%'"),
        ([{"layers": "0-125%", "bits": 4}], "0 <= low < high <= 1"),
        ([{"layers": "a-b%", "bits": 4}], "by depth must be 'LOW-HIGH%'"),
        ([{"first": 0, "last": 1, "depth": (0, 0.5)}], "by first/last or by depth, not both"),
    ],
    ids=[
        "bad-range",
        "reversed-range",
        "budget-above-1",
        "unknown-scorer",
        "unknown-field",
        "not-a-dict",
        "unsupported-bits",
        "bool-bits",
        "reversed-depth",
        "depth-above-1",
        "depth-not-numbers",
        "range-and-depth",
    ],
)
def test_bad_overrides_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        SubTokenConfig(budget=0.3, overrides=overrides, recipe=None)


def test_budget_overrides_that_starve_the_rest_are_refused():
    config = SubTokenConfig(budget=0.25, overrides=[{"layers": "0-1", "budget": 0.9}], recipe=None)
    with pytest.raises(ValueError, match="leaving nothing"):
        config.layer_settings(3)


def test_budget_override_needs_token_eviction():
    with pytest.raises(ValueError, match="overrides with a budget need"):
        SubTokenConfig(keep_groups=4, overrides=[{"layers": 0, "budget": 0.5}], recipe=None)


def test_budget_overrides_that_push_the_rest_above_one_are_refused():
    # 3 x 0.9 - 0.1 = 2.6 left for 2 layers: 1.3 each, which no layer can hold
    config = SubTokenConfig(budget=0.9, overrides=[{"layers": 0, "budget": 0.1}], recipe=None)
    with pytest.raises(ValueError, match=r"overrides \[\{'layers': 0, 'budget': 0.1\}\].*need budget 1\.300 each, above 1\.0"):
        config.layer_settings(3)
    fits = SubTokenConfig(budget=0.75, overrides=[{"layers": 0, "budget": 0.5}], recipe=None)
    assert [s.budget for s in fits.layer_settings(2)] == [0.5, 1.0]  # exactly 1.0 is allowed


@pytest.mark.parametrize("layer_budgets", ["uniform", "adaptive"])
def test_bits_override_stores_those_layers_in_its_precision_within_the_budget(layer_budgets):
    """2 bits everywhere but 4 in layers 0-1: the tensors held say so (their codes' widths), and
    the cache keeps the overall budget (the cross-layer split weighs each layer's own format)."""
    config = SubTokenConfig(
        budget=0.15, bits=2, num_groups=2, window=16, floor_tokens=0, layer_budgets=layer_budgets,
        overrides=[{"layers": "0-1", "bits": 4}], recipe=None,
    )
    model = make_tiny_model("llama", num_hidden_layers=4, head_dim=64, num_attention_heads=2,
                            num_key_value_heads=1, hidden_size=128)
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        model(input_ids=random_prompts(1, 400), past_key_values=cache)
    held_bits = [layer.packed_keys.bits for layer in cache.layers]  # the stored codes themselves
    assert held_bits == [4, 4, 2, 2]
    report = cache.memory_report()
    assert [row["bits"] for row in report["per_layer"]] == held_bits
    if layer_budgets == "uniform":
        tokens = [layer.packed_keys.shape[-2] for layer in cache.layers]
        assert tokens[0] < tokens[2], "at one budget, 4-bit layers keep fewer tokens than 2-bit ones"
    assert report["ratio"] <= 0.15 * 1.01


def test_bits_override_round_trips():
    config = SubTokenConfig(budget=0.1, bits=2, overrides=[{"layers": "0-7", "bits": 4}], recipe=None)
    assert config.overrides[0].to_dict() == {"layers": "0-7", "bits": 4}
    assert SubTokenConfig(**config.to_dict()).overrides == config.overrides


@pytest.mark.parametrize(
    "layers, num_layers, expected",
    [
        ("0-25%", 30, range(0, 8)),  # i / 30 < 0.25: layers 0..7
        ("0-25%", 4, range(0, 1)),
        ("0-25%", 2, range(0, 1)),
        ("50-100%", 30, range(15, 30)),
        ("0%-100%", 3, range(0, 3)),
    ],
)
def test_depth_overrides_name_a_share_of_any_models_layers(layers, num_layers, expected):
    override = LayerOverride.parse({"layers": layers, "bits": 4})
    assert override.layers(num_layers) == expected
    assert LayerOverride.parse(override.to_dict()) == override
    config = SubTokenConfig(budget=0.1, bits=2, overrides=[override], recipe=None)
    held = [s.bits for s in config.layer_settings(num_layers)]
    assert held == [4 if i in expected else 2 for i in range(num_layers)]


def test_a_depth_override_that_names_no_layer_is_refused():
    config = SubTokenConfig(budget=0.1, bits=2, overrides=[{"layers": "61-62%", "bits": 4}], recipe=None)
    assert [s.bits for s in config.layer_settings(100)].count(4) == 1  # layer 61
    with pytest.raises(ValueError, match=r"overrides\[0\]: 61-62% names no layer of a 30-layer model"):
        config.layer_settings(30)  # 18/30 = 0.600 and 19/30 = 0.633 both fall outside


@pytest.mark.parametrize("layer_budgets", ["uniform", "adaptive"])
def test_a_budget_override_by_depth_holds_what_the_same_layers_by_index_hold(layer_budgets):
    """"0-50%" of 4 layers is layers 0-1: the cache built either way holds the same tensors
    (their budgets fixed, left out of the cross-layer split)."""
    model = make_tiny_model("llama", num_hidden_layers=4)
    prompt = random_prompts(1, 300)
    held = {}
    for layers in ("0-50%", "0-1"):
        config = SubTokenConfig(budget=0.3, layer_budgets=layer_budgets, floor_tokens=0, recipe=None,
                                overrides=[{"layers": layers, "budget": 0.5}])
        cache = SubTokenCache(model, config)
        with torch.no_grad():
            model(input_ids=prompt, past_key_values=cache)
        held[layers] = [row["stored_bytes"] for row in cache.memory_report()["per_layer"]]
    assert held["0-50%"] == held["0-1"]
    assert held["0-1"][0] > held["0-1"][2]  # the overridden layers keep more than the rest
