"""`hf-subtok recipes --search`: candidates measured, a recipe good everywhere chosen, the table written."""

from __future__ import annotations

import json

import pytest
import torch

from hf_subtok import SubTokenCache, recipes
from hf_subtok.bench import recipe_search
from hf_subtok.bench.recipe_search import Measured, choose, summarize, table_rows, write_table


def _measured(candidate, budget, correct, cases, worst_ppl, ratio=0.1):
    half = cases // 2
    needle = {"in_prompt": [min(correct, half), half], "after": [max(0, correct - half), cases - half]}
    return Measured(candidate, budget, needle, {"ppl@2048": worst_ppl / 2, "legal@2048": worst_ppl}, ratio)


def test_choose_prefers_the_recipe_good_everywhere_among_those_as_accurate():
    group = [
        _measured("sharp", 0.1, 23, 24, 0.09),  # best needle, but +9% perplexity on one text
        _measured("steady", 0.1, 21, 24, 0.01),  # inside the best's interval (0.80-0.99), +1%
        _measured("blunt", 0.1, 12, 24, 0.0),  # no perplexity loss, but half the needles
        _measured("sharp", 0.25, 24, 24, 0.02),
        _measured("steady", 0.25, 24, 24, 0.02, ratio=0.05),  # as good, fewer bytes
    ]
    chosen = choose(group)
    assert chosen[0.1].candidate == "steady"
    assert chosen[0.25].candidate == "steady"


def test_summarize_pools_settings_and_texts_against_dense():
    rows = [
        {"suite": "ppl", "method": "dense", "family": "dense", "status": "ok", "text": "ppl", "prefix_tokens": 2048,
         "ppl": 10.0},
        {"suite": "ppl", "method": "dense", "family": "dense", "status": "ok", "text": "legal", "prefix_tokens": 2048,
         "ppl": 20.0},
        # dense prefilled in chunks is not the reference
        {"suite": "ppl", "method": "dense[prefill_chunk=64]", "family": "dense", "status": "ok", "text": "ppl",
         "prefix_tokens": 2048, "ppl": 99.0},
        {"suite": "ppl", "method": "subtok[a]@0.1", "family": "subtok", "status": "ok", "variant": "a", "budget": 0.1,
         "text": "ppl", "prefix_tokens": 2048, "ppl": 10.5, "ratio": 0.09},
        {"suite": "ppl", "method": "subtok[a]@0.1", "family": "subtok", "status": "ok", "variant": "a", "budget": 0.1,
         "text": "legal", "prefix_tokens": 2048, "ppl": 21.0, "ratio": 0.1},
        *[{"suite": "needle", "family": "subtok", "status": "ok", "variant": "a", "budget": 0.1,
           "setting": s, "correct": c, "ratio": 0.095} for s, c in
          [("in_prompt", True), ("in_prompt", False), ("after", True), ("after", True)]],
        {"suite": "needle", "family": "subtok", "status": "unreachable", "variant": "b", "budget": 0.1,
         "setting": "after", "reason": "too small"},
    ]
    (m,) = summarize(rows)
    assert (m.candidate, m.budget, m.correct, m.cases) == ("a", 0.1, 3, 4)
    assert m.needle == {"in_prompt": [1, 2], "after": [2, 2]}
    assert m.ppl_change == pytest.approx({"ppl@2048": 0.05, "legal@2048": 0.05})
    assert m.ratio == pytest.approx((0.09 + 0.1 + 4 * 0.095) / 6)


def test_write_table_replaces_one_dtype_and_refuses_a_row_that_cannot_run(tmp_path):
    path = tmp_path / "recipes.json"
    path.write_text(json.dumps({"generated": {"float32": {"command": "old"}}, "recipes": {"float32": [
        {"budget": 0.25, "candidate": "all-axes", "fields": {"bits": "auto"}, "measured": {}}]}}))
    rows = table_rows({0.25: _measured("all-axes-4bit-rotated", 0.25, 20, 24, 0.01)}, "bfloat16")
    write_table(path, "bfloat16", rows, {"command": "new"})
    data = json.loads(path.read_text())
    assert data["recipes"]["float32"][0]["candidate"] == "all-axes"
    assert data["recipes"]["bfloat16"][0]["fields"] == recipe_search.CANDIDATES["all-axes-4bit-rotated"]
    assert data["recipes"]["bfloat16"][0]["measured"]["needle_accuracy"][0] == pytest.approx(20 / 24, abs=1e-4)
    before = path.read_text()
    bad = [recipes.Recipe("float32", 0.1, "bad", {"rotate": True}, {})]  # rotate needs bits
    with pytest.raises(ValueError, match="rotate"):
        write_table(path, "float32", bad, {"command": "bad"})
    assert path.read_text() == before


def test_a_search_on_a_tiny_model_writes_a_table_the_cache_reads(tmp_path, tiny_chat_model, smollm_tokenizer,
                                                                   monkeypatch):
    candidates = {"tokens": {}, "two-groups": {"num_groups": 2, "window": 16, "pack_chunk": 8}}
    measured, _, catalog = recipe_search.run_search(
        dtype="float32", budgets=[0.5], out_dir=tmp_path / "out", needle_lengths=[384], needle_depths=[0.5],
        needle_seeds=[0], ppl_prefixes=[256], ppl_eval_tokens=16, candidates=candidates,
        model=tiny_chat_model, tokenizer=smollm_tokenizer,
    )
    assert sorted(m.candidate for m in measured) == ["tokens", "two-groups"]
    for m in measured:  # one needle case per setting, perplexity on both texts
        assert m.cases == 2 and set(m.ppl_change) == {"ppl@256", "legal@256"}
        assert 0 < m.ratio <= 0.5 * 1.02
    chosen = choose(measured)
    table_path = tmp_path / "recipes.json"
    write_table(table_path, "float32", table_rows(chosen, "float32", catalog), {"command": "test"})
    table = recipes.parse_table(json.loads(table_path.read_text()))
    monkeypatch.setattr(recipes, "load_table", lambda: table)
    cache = SubTokenCache(tiny_chat_model, budget=0.5)
    assert cache.recipe.candidate == chosen[0.5].candidate
    assert cache.config.num_groups == candidates[chosen[0.5].candidate].get("num_groups", 8)
    assert tiny_chat_model.dtype == torch.float32


def test_the_cli_shows_the_shipped_table(capsys):
    from hf_subtok.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for budget in ("0.25", "0.125", "0.1"):
        assert f"| float32 | {budget} |" in out and f"| bfloat16 | {budget} |" in out
    assert "recipes --search" in out


def test_candidates_markdown_marks_the_chosen_one():
    from hf_subtok.bench.recipe_search import candidates_markdown

    group = [_measured("sharp", 0.1, 23, 24, 0.09), _measured("steady", 0.1, 21, 24, 0.01)]
    text = candidates_markdown(group, choose(group))
    assert "| 0.1 | **steady** |" in text and "| 0.1 | sharp |" in text
    assert "+9.0%" in text and "0.88 (" in text  # sharp's legal change; steady's 21/24


def test_ruler_ranks_out_a_candidate_the_needle_would_keep():
    """With RULER measured, a candidate inside the best needle's interval but outside the best
    RULER score's interval is no contender, however small its perplexity change."""
    needle_only = _measured("needle-only", 0.1, 23, 24, 0.0)
    needle_only.ruler = {"in_prompt": [2.0, 16], "after": [1.0, 16]}  # 3/32
    general = _measured("general", 0.1, 22, 24, 0.02)
    general.ruler = {"in_prompt": [12.5, 16], "after": [9.0, 16]}  # 21.5/32
    assert choose([needle_only, general])[0.1].candidate == "general"
    assert general.ruler_score == pytest.approx(21.5 / 32) and general.ruler_cases == 32
    unmeasured = _measured("needle-only", 0.1, 23, 24, 0.0)  # without RULER the needle rule alone decides
    assert choose([unmeasured, _measured("general", 0.1, 22, 24, 0.02)])[0.1].candidate == "needle-only"
    (row,) = table_rows({0.1: general}, "float32", {0.1: {"general": {"bits": 4, "rotate": True}}})
    assert row.measured["ruler"] == {"in_prompt": [12.5, 16], "after": [9.0, 16]}
    assert row.measured["ruler_score"][0] == pytest.approx(21.5 / 32, abs=1e-4)


def test_summarize_reads_ruler_rows_with_partial_credit():
    rows = [
        *[{"suite": "needle", "family": "subtok", "status": "ok", "variant": "a", "budget": 0.1,
           "setting": "after", "correct": True, "ratio": 0.1}],
        *[{"suite": "ruler", "family": "subtok", "status": "ok", "variant": "a", "budget": 0.1,
           "setting": s, "score": score, "correct": score == 1.0, "ratio": 0.1}
          for s, score in [("in_prompt", 1.0), ("in_prompt", 0.5), ("after", 0.0), ("after", 0.25)]],
        {"suite": "ruler", "family": "dense", "status": "ok", "setting": "after", "score": 1.0, "method": "dense"},
    ]
    (m,) = summarize(rows)
    assert m.ruler == {"in_prompt": [1.5, 2], "after": [0.25, 2]}
    assert m.ruler_score == pytest.approx(1.75 / 4)


def test_a_search_with_ruler_on_a_tiny_model_records_it(tmp_path, tiny_chat_model, smollm_tokenizer):
    measured, _, catalog = recipe_search.run_search(
        dtype="float32", budgets=[0.5], out_dir=tmp_path / "out", needle_lengths=[384], needle_depths=[0.5],
        needle_seeds=[0], ppl_prefixes=[256], ppl_eval_tokens=16, candidates={"tokens": {}},
        ruler_contexts=[512], ruler_cases=1, ruler_families=["niah_single", "vt"],
        model=tiny_chat_model, tokenizer=smollm_tokenizer,
    )
    (m,) = measured
    assert m.ruler_cases == 4 and set(m.ruler) == {"in_prompt", "after"}  # 2 families x 2 settings
    (row,) = table_rows(choose(measured), "float32", catalog)
    assert sum(n for _, n in row.measured["ruler"].values()) == 4
    assert (tmp_path / "out" / "ruler").is_dir()


def test_the_cli_hands_ruler_lengths_to_the_search(monkeypatch, tmp_path):
    from hf_subtok.cli import main

    seen = {}

    def fake_search(**grid):
        seen.update(grid)
        return [], {}, {}

    monkeypatch.setattr(recipe_search, "run_search", fake_search)
    argv = ["recipes", "--search", "--ruler-contexts", "2k,4k", "--ruler-cases", "3", "--table", str(tmp_path / "t.json")]
    assert main(argv) == 2  # the fake search ran nothing: "no candidate ran"
    assert seen["ruler_contexts"] == [2048, 4096] and seen["ruler_cases"] == 3
