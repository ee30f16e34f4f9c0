"""`budget=b` alone takes the table's recipe for b and the model's dtype; fields given win."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import hf_subtok
from hf_subtok import SubTokenCache, SubTokenConfig, cache_kwargs, recipes
from hf_subtok.config import LayerOverride
from hf_subtok.presets import PRESET_BUDGETS
from tests.recipe_tables import use_table
from tests.tiny_models import make_tiny_model, random_prompts

_WIDE = dict(head_dim=64, num_attention_heads=2, num_key_value_heads=1, hidden_size=128)
SHIPPED = Path(hf_subtok.__file__).parent / "data" / recipes.TABLE_FILE

# a table whose rows differ in every way a test can see
CUSTOM = {
    "generated": {},
    "recipes": {
        "float32": [
            {"budget": 0.25, "candidate": "f32-quarter", "fields": {"num_groups": 2, "window": 16, "bits": "auto"},
             "measured": {}},
            {"budget": 0.1, "candidate": "f32-tenth", "fields": {"num_groups": 4, "window": 8, "bits": 2, "rotate": True},
             "measured": {}},
        ],
        "bfloat16": [
            {"budget": 0.25, "candidate": "bf16-quarter", "fields": {"num_groups": 4, "window": 32, "bits": 4},
             "measured": {}},
        ],
    },
}


@pytest.fixture
def custom_table(monkeypatch):
    return use_table(monkeypatch, CUSTOM)


def _model(dtype=torch.float32):
    return make_tiny_model("llama", dtype=dtype, **_WIDE)


def test_budget_alone_takes_the_nearest_row_of_the_model_dtype(custom_table):
    cache = SubTokenCache(_model(), budget=0.1)
    assert cache.recipe.candidate == "f32-tenth"
    assert (cache.config.num_groups, cache.config.window, cache.config.bits, cache.config.rotate) == (4, 8, 2, True)
    assert cache.config.budget == 0.1 and cache.config.recipe is None
    assert cache.memory_report()["recipe"]["candidate"] == "f32-tenth"
    # the same through a config object, and through a preset name
    assert SubTokenCache(_model(), SubTokenConfig(budget=0.1)).config == cache.config
    assert SubTokenCache(_model(), "compact").config == cache.config
    quarter = SubTokenCache(_model(), "balanced")
    assert quarter.recipe.candidate == "f32-quarter" and quarter.config.bits == "auto"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_models_read_the_bfloat16_table(custom_table, dtype):
    cache = SubTokenCache(_model(dtype), budget=0.1)  # the only bf16 row is at 0.25
    assert cache.recipe.candidate == "bf16-quarter"
    assert (cache.config.num_groups, cache.config.window, cache.config.bits) == (4, 32, 4)


@pytest.mark.parametrize(
    "budget, candidate",
    [(0.9, "f32-quarter"), (0.16, "f32-quarter"), (0.15, "f32-tenth"), (0.01, "f32-tenth")],
)
def test_a_budget_between_rows_takes_the_nearest_on_a_log_scale(custom_table, budget, candidate):
    # log(0.25 / 0.16) = 0.446 < log(0.16 / 0.1) = 0.470; log(0.25 / 0.15) = 0.511 > log(0.15 / 0.1) = 0.405
    assert recipes.recipe_for(budget, torch.float32).candidate == candidate


def test_fields_the_user_sets_win_even_at_their_default_value(custom_table):
    config = SubTokenConfig(budget=0.1, window=64, bits=None, rotate=False)  # every one equals its default
    cache = SubTokenCache(_model(), config)
    assert (cache.config.window, cache.config.bits, cache.config.rotate) == (64, None, False)
    assert cache.config.num_groups == 4  # not given: the recipe's
    kwargs = SubTokenCache(_model(), budget=0.1, window=64, bits=None, rotate=False)
    assert kwargs.config == cache.config


def test_a_copy_keeps_its_changed_fields_and_takes_the_recipe_for_its_budget(custom_table):
    base = SubTokenConfig(budget=0.1)
    quarter = SubTokenCache(_model(), dataclasses.replace(base, budget=0.25))
    assert quarter.recipe.candidate == "f32-quarter" and quarter.config.num_groups == 2
    four_bits = SubTokenCache(_model(), dataclasses.replace(base, bits=4))
    assert four_bits.config.bits == 4 and four_bits.config.num_groups == 4
    assert SubTokenConfig(**base.to_dict()) == base


def test_no_recipe_without_a_budget_below_one_or_with_recipe_none(custom_table):
    for config in (
        SubTokenConfig(),
        SubTokenConfig(budget=1.0),
        SubTokenConfig(budget=0.1, recipe=None),
        SubTokenConfig(budget=0.25, axes="tokens"),  # the user chose what the budget cuts
        SubTokenConfig(budget=0.75, axes="groups"),
    ):
        cache = SubTokenCache(_model(), config)
        assert cache.recipe is None and cache.config == config
        assert cache.memory_report()["recipe"] is None


def test_full_precision_given_drops_the_recipes_quantization_fields(custom_table):
    """`bits=None` keeps every value in the model's dtype: the row's rotation (which only
    quantized storage has) is left out, its other fields still apply."""
    model = _model()
    cache = SubTokenCache(model, budget=0.1, bits=None)
    assert (cache.config.bits, cache.config.rotate) == (None, False)
    assert (cache.config.num_groups, cache.config.window) == (4, 8)  # the row's
    with torch.no_grad():
        model(input_ids=random_prompts(1, 300), **cache_kwargs(cache))
    assert all(layer.storage.bits is None for layer in cache.layers)


def test_a_recipe_that_conflicts_with_the_fields_given_names_it(custom_table, monkeypatch):
    coded = dict(CUSTOM, recipes={"float32": [
        {"budget": 0.1, "candidate": "f32-coded", "fields": {"bits": 2, "value_codes": 16}, "measured": {}}]})
    use_table(monkeypatch, coded)
    with pytest.raises(ValueError, match="f32-coded.*value_codes needs bits.*recipe=None"):
        SubTokenCache(_model(), budget=0.1, bits="auto")  # codeword values need one precision
    with pytest.raises(ValueError, match="recipe must be one of"):
        SubTokenConfig(budget=0.1, recipe="best")
    with pytest.raises(ValueError, match="either a SubTokenConfig or its fields"):
        SubTokenCache(_model(), SubTokenConfig(), budget=0.1)


def test_from_dense_takes_the_same_recipe(custom_table):
    from transformers import DynamicCache

    model = _model()
    dense = DynamicCache()
    with torch.no_grad():
        model(input_ids=random_prompts(1, 200), **cache_kwargs(dense))
    cache = SubTokenCache.from_dense(model, SubTokenConfig(budget=0.1, floor_tokens=0), dense)
    assert cache.recipe.candidate == "f32-tenth" and cache.config.bits == 2


def test_the_shipped_table():
    data = json.loads(SHIPPED.read_text())  # read here, not through the package
    for dtype in recipes.TABLE_DTYPES:
        rows = data["recipes"][dtype]
        assert {row["budget"] for row in rows} >= set(PRESET_BUDGETS.values())
        generated = data["generated"][dtype]
        assert "recipes --search" in generated["command"] and generated["commit"]
        for row in rows:
            measured = row["measured"]
            assert measured["ratio"] <= row["budget"] * 1.02  # the search measured it within its budget
            assert sum(n for _, n in measured["needle"].values()) >= 24
            expected = {**{f.name: f.default for f in dataclasses.fields(SubTokenConfig)
                           if f.name in recipes.RECIPE_FIELDS and f.name != "overrides"}, **row["fields"]}
            expected["overrides"] = [LayerOverride.parse(o) for o in expected.get("overrides", [])]
            model = _model(torch.float32 if dtype == "float32" else torch.bfloat16)
            cache = SubTokenCache(model, budget=row["budget"], floor_tokens=0)
            assert {k: getattr(cache.config, k) for k in expected} == expected
            with torch.no_grad():  # and the recipe runs within its budget
                model(input_ids=random_prompts(1, 300), **cache_kwargs(cache))
            assert cache.memory_report()["ratio"] <= row["budget"] * 1.01


def test_a_field_that_needs_bits_takes_the_recipes_bits(custom_table, monkeypatch):
    """`budget=0.1, log_scales="keys"` (or `key_clip`, `rotate`, `value_codes`) leaves bits to the
    recipe: the field is checked against the bits the recipe gives, not refused for bits=None."""
    for extra in ({"log_scales": "keys"}, {"key_clip": True}, {"rotate": True}, {"value_codes": 16}):
        config = SubTokenConfig(budget=0.1, **extra)  # no bits yet: the recipe's are awaited
        cache = SubTokenCache(_model(), config)
        assert cache.config.bits == 2 and all(getattr(cache.config, k) == v for k, v in extra.items())
    with pytest.raises(ValueError, match="rotate=True needs bits="):  # fields as written: nothing fills bits
        SubTokenConfig(budget=0.1, rotate=True, recipe=None)
    with pytest.raises(ValueError, match="rotate=True needs bits="):  # no budget: no recipe either
        SubTokenConfig(rotate=True)
    with pytest.raises(ValueError, match="rotate must be True or False"):  # types are checked at once
        SubTokenConfig(budget=0.1, rotate="yes")
    use_table(monkeypatch, {"generated": {}, "recipes": {"float32": [
        {"budget": 0.1, "candidate": "tokens-only", "fields": {}, "measured": {}}]}})
    with pytest.raises(ValueError, match="conflicts with the fields given: rotate=True needs bits="):
        SubTokenCache(_model(), budget=0.1, rotate=True)  # a recipe in full precision leaves rotate nothing
