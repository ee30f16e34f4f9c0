"""A recipe that sets some layers apart (by depth): what the cache then holds, and who wins."""

from __future__ import annotations

import pytest
import torch

from hf_subtok import SubTokenCache, cache_kwargs, recipes
from hf_subtok.config import LayerOverride
from tests.recipe_tables import use_table
from tests.tiny_models import make_tiny_model, random_prompts

# 2 bits everywhere but the first quarter of the layers, which keep 4
EARLY_FOUR = {
    "generated": {},
    "recipes": {
        "float32": [
            {"budget": 0.15, "candidate": "early-four",
             "fields": {"bits": 2, "num_groups": 2, "window": 16, "rotate": True,
                        "overrides": [{"layers": "0-25%", "bits": 4}]},
             "measured": {}},
        ],
    },
}


@pytest.fixture
def early_four(monkeypatch):
    return use_table(monkeypatch, EARLY_FOUR)


def _model(num_layers: int):
    return make_tiny_model("llama", num_hidden_layers=num_layers, head_dim=64, num_attention_heads=2,
                           num_key_value_heads=1, hidden_size=128)


@pytest.mark.parametrize("num_layers, early", [(4, 1), (8, 2)])
def test_the_recipes_layers_by_depth_hold_their_own_precision(early_four, num_layers, early):
    model = _model(num_layers)
    cache = SubTokenCache(model, budget=0.15, floor_tokens=0)
    assert cache.recipe.candidate == "early-four"
    with torch.no_grad():
        model(input_ids=random_prompts(1, 400), **cache_kwargs(cache))
    held = [layer.packed_keys.bits for layer in cache.layers]  # the codes the cache holds
    assert held == [4] * early + [2] * (num_layers - early)
    assert cache.memory_report()["ratio"] <= 0.15 * 1.01


def test_the_users_overrides_come_after_the_recipes_and_win(early_four):
    cache = SubTokenCache(_model(4), budget=0.15, overrides=[{"layers": 0, "bits": 8}, {"layers": 3, "bits": 4}])
    assert cache.config.overrides == [
        LayerOverride(depth=(0.0, 0.25), bits=4), LayerOverride(first=0, last=0, bits=8),
        LayerOverride(first=3, last=3, bits=4),
    ]
    assert [s.bits for s in cache.layer_configs] == [8, 2, 2, 4]


@pytest.mark.parametrize("bits", [8, None])
def test_bits_the_user_gives_hold_in_every_layer(early_four, bits):
    """bits given for the whole model (8, or None: full precision) drop the recipe's per-layer bits."""
    model = _model(4)
    cache = SubTokenCache(model, budget=0.15, bits=bits, floor_tokens=0)
    assert cache.config.overrides == [] and cache.config.num_groups == 2  # the row's other fields hold
    assert [s.bits for s in cache.layer_configs] == [bits] * 4
    with torch.no_grad():
        model(input_ids=random_prompts(1, 400), **cache_kwargs(cache))
    assert [layer.storage.bits for layer in cache.layers] == [bits] * 4


def test_a_recipe_naming_layers_by_index_is_refused():
    with pytest.raises(ValueError, match="recipe overrides must name layers by depth"):
        recipes.Recipe("float32", 0.1, "by-index", {"bits": 2, "overrides": [{"layers": "0-7", "bits": 4}]}, {})
