"""`SubTokenConfig` keeps what the user gave: `replace`, `to_dict` and JSON round trips work,
and derived values are properties."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hf_subtok import SubTokenConfig
from hf_subtok.config import LayerOverride
from hf_subtok.presets import PRESETS


def _json_round_trip(config: SubTokenConfig) -> SubTokenConfig:
    return SubTokenConfig(**json.loads(json.dumps(config.to_dict())))


def test_replace_derives_again_from_the_new_fields():
    config = dataclasses.replace(SubTokenConfig(), window=8)
    assert config.pack_chunk is None and config.chunk_tokens == 4
    # without a budget K defaults to num_groups // 2; with one, the budget picks it
    assert SubTokenConfig().keep_groups is None and SubTokenConfig().groups_kept == 4
    with_budget = dataclasses.replace(SubTokenConfig(), budget=0.5)
    assert with_budget.keep_groups is None and with_budget.groups_kept is None
    assert dataclasses.replace(SubTokenConfig(), num_groups=2).groups_kept == 1


def test_given_values_win_over_derived_ones():
    config = SubTokenConfig(window=16, pack_chunk=3, keep_groups=2)
    assert config.chunk_tokens == 3 and config.groups_kept == 2
    assert SubTokenConfig(window=0).chunk_tokens == 1


def test_fields_hold_what_was_given():
    config = SubTokenConfig(budget=1)
    assert config.budget == 1 and config.to_dict()["pack_chunk"] is None
    assert config.to_dict()["keep_groups"] is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"window": 8},
        {"budget": 0.25, "bits": "auto", "num_groups": 2, "window": 16, "pack_chunk": 8},
        {"budget": 0.3, "overrides": [{"layers": "0-1", "budget": 0.4}, {"layers": 2, "token_scorer": "key_norm"}]},
        {"budget": 0.3, "overrides": [LayerOverride(first=0, last=0, budget=0.2, router="value_norm")]},
        *[dict(p) for p in PRESETS.values()],
    ],
    ids=["defaults", "window", "all-axes", "dict-overrides", "layer-override", *PRESETS],
)
def test_json_round_trip_gives_an_equal_config(kwargs):
    config = SubTokenConfig(**kwargs)
    assert _json_round_trip(config) == config
    assert dataclasses.replace(config) == config


def test_overrides_compare_equal_however_they_are_written():
    as_dict = SubTokenConfig(budget=0.3, overrides=[{"layers": "1-2", "budget": 0.2}])
    as_object = SubTokenConfig(budget=0.3, overrides=[LayerOverride(first=1, last=2, budget=0.2)])
    assert as_dict == as_object
    assert as_dict.to_dict()["overrides"] == [{"layers": "1-2", "budget": 0.2}]
    assert LayerOverride.parse(LayerOverride(3, 3, token_scorer="key_norm").to_dict()) == LayerOverride(
        3, 3, token_scorer="key_norm"
    )


def test_budget_one_is_accepted_and_documented_as_lossless():
    assert SubTokenConfig(budget=1.0).budget == 1.0
    help_text = {f.name: f.metadata["help"] for f in dataclasses.fields(SubTokenConfig)}["budget"]
    assert "1.0 keeps every token" in help_text
