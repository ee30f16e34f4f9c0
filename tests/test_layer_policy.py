"""A policy per band of layers (issue 23.7): measured on held-out text, kept only when better,
and run by the recipe search as one more candidate beside the one policy it started from."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hf_subtok import SubTokenCache, SubTokenConfig, cache_kwargs
from hf_subtok.bench import layer_policy, recipe_search
from hf_subtok.bench.layer_policy import band_options, band_ranges, search_policy
from hf_subtok.tasks import as_input_ids, build_ppl_case

FIELDS = {"num_groups": 2, "window": 16, "pack_chunk": 8, "bits": 4}


def _oracle_nll(model, tokenizer, fields, budget, overrides, prefix_tokens, eval_tokens) -> float:
    """The held-out NLL by a prefill through the cache itself (no shared dense prefill)."""
    case = build_ppl_case(tokenizer, prefix_tokens, eval_tokens, "haystack")
    prefix, eval_ids = as_input_ids(case.prefix_ids), as_input_ids(case.eval_ids)
    config = SubTokenConfig(**fields, budget=budget, recipe=None, overrides=overrides)
    cache = SubTokenCache(model, config)
    with torch.no_grad():
        first = model(input_ids=prefix, **cache_kwargs(cache)).logits[:, -1]  # [1, V]
        rest = model(input_ids=eval_ids[:, :-1], **cache_kwargs(cache)).logits[0]  # [E-1, V]
    logits = torch.cat([first, rest]).float()
    return float(F.cross_entropy(logits, eval_ids[0]))


def test_band_ranges_and_options():
    assert band_ranges(4) == ["0-25%", "25-50%", "50-75%", "75-100%"]
    options = band_options(FIELDS, 0.5)
    assert {"token_scorer": "tova"} in options and {"token_scorer": "snapkv"} not in options
    assert {"bits": 2} in options and {"bits": "auto"} in options and {"bits": 4} not in options
    assert {"budget": 0.25} in options and {"budget": 0.75} in options
    assert not any("bits" in o for o in band_options({}, 0.8))  # full precision: no precision to vary
    assert {"budget": 1.2} not in band_options({}, 0.8)
    with pytest.raises(ValueError, match="bands must be >= 1"):
        band_ranges(0)


def test_the_policy_found_measures_what_a_prefill_through_the_cache_gives(tiny_chat_model, smollm_tokenizer):
    model, budget = tiny_chat_model, 0.4
    result = search_policy(model, smollm_tokenizer, FIELDS, budget, bands=2, prefix_tokens=300, eval_tokens=24,
                           margin=0.0)
    per_band = len(band_options(FIELDS, budget))
    assert len(result.trials) == 2 * per_band  # every option of every band ran
    assert result.base_nll == pytest.approx(
        _oracle_nll(model, smollm_tokenizer, FIELDS, budget, [], 300, 24), abs=1e-4)
    assert result.nll == pytest.approx(
        _oracle_nll(model, smollm_tokenizer, FIELDS, budget, result.overrides, 300, 24), abs=1e-4)
    current = result.base_nll
    for band in band_ranges(2):  # a band keeps its best setting only when it lowers the NLL
        tried = [t for t in result.trials if t.band == band]
        best = min(tried, key=lambda t: t.nll)
        assert best.kept == (best.nll < current)
        assert sum(t.kept for t in tried) == int(best.kept)
        current = min(current, best.nll)
    assert [o["layers"] for o in result.overrides] == [t.band for t in result.trials if t.kept]
    assert result.nll == pytest.approx(current)


def test_a_margin_no_setting_clears_keeps_the_one_policy(tiny_chat_model, smollm_tokenizer):
    result = search_policy(tiny_chat_model, smollm_tokenizer, FIELDS, 0.4, bands=1, prefix_tokens=300,
                           eval_tokens=24, margin=100.0)
    assert result.overrides == [] and result.nll == result.base_nll
    assert not any(t.kept for t in result.trials)


def test_the_recipe_search_runs_the_policy_per_band_as_a_candidate(tmp_path, tiny_chat_model, smollm_tokenizer,
                                                                   monkeypatch):
    candidates = {"four-bit": FIELDS}
    kwargs = dict(
        dtype="float32", budgets=[0.5], out_dir=tmp_path / "out", needle_lengths=[384], needle_depths=[0.5],
        needle_seeds=[0], ppl_prefixes=[256], ppl_eval_tokens=16, candidates=candidates, layer_policy=True,
        policy_options={"bands": 2, "prefix_tokens": 300, "eval_tokens": 24, "margin": float("-inf")},
        model=tiny_chat_model, tokenizer=smollm_tokenizer,
    )
    measured, _, catalog = recipe_search.run_search(**kwargs)
    assert sorted(m.candidate for m in measured) == ["four-bit", "four-bit+layers"]
    overrides = catalog[0.5]["four-bit+layers"]["overrides"]
    assert [o["layers"] for o in overrides] == ["0-50%", "50-100%"]  # margin -inf: every band keeps its best
    saved = json.loads((tmp_path / "out" / "layer_policy.json").read_text())
    assert saved["0.5"]["base"] == "four-bit" and saved["0.5"]["overrides"] == overrides
    per_layer = next(m for m in measured if m.candidate == "four-bit+layers")
    assert per_layer.cases == 2 and 0 < per_layer.ratio <= 0.5 * 1.02
    rows = recipe_search.table_rows({0.5: per_layer}, "float32", catalog)
    assert rows[0].fields["overrides"] == overrides  # what a table row would carry

    def no_search(*args, **kw):
        raise AssertionError("the saved policy should be read back")

    monkeypatch.setattr(layer_policy, "search_policy", no_search)
    again, _, catalog_again = recipe_search.run_search(**kwargs)  # resumed: nothing runs again
    assert catalog_again == catalog
    assert [(m.candidate, m.correct, m.ppl_change) for m in again] == [
        (m.candidate, m.correct, m.ppl_change) for m in measured]
