"""The RULER-style suite: generation (real tokenizer, no weights), scorers, summary rows, the
`bench --suite ruler` command on a tiny random model, and the second perplexity text."""

from __future__ import annotations

import csv
import json
from functools import cache

import pytest

from hf_subtok.bench import MethodSpec, ruler
from hf_subtok.bench.intervals import wilson
from hf_subtok.bench.ruler import (
    FAMILIES,
    RulerCase,
    build_ruler_case,
    string_match_all,
    string_match_part,
)
from hf_subtok.bench.ruler_eval import markdown_tables, summarize
from hf_subtok.bench.ruler_qa import BLANK, cloze_candidates, paragraphs
from hf_subtok.bench.runner import run_ruler_suite
from hf_subtok.tasks import build_ppl_case, load_text


@cache
def _case(tokenizer, family: str, length: int, index: int = 0, seed: int = 0) -> RulerCase:
    return build_ruler_case(tokenizer, family, length, index, seed)


# --- generation --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_cases_are_deterministic_per_family_length_index_and_seed(smollm_tokenizer, family):
    a = _case(smollm_tokenizer, family, 1024)
    assert a == build_ruler_case(smollm_tokenizer, family, 1024, 0, 0)
    assert a.prompt_ids != build_ruler_case(smollm_tokenizer, family, 1024, 1, 0).prompt_ids
    assert a.prompt_ids != build_ruler_case(smollm_tokenizer, family, 1024, 0, 1).prompt_ids


@pytest.mark.parametrize("length", [2048, 8192])
@pytest.mark.parametrize("family", FAMILIES)
def test_length_answers_and_withheld_question(smollm_tokenizer, family, length):
    tok = smollm_tokenizer
    case = _case(tok, family, length)
    assert 0.98 * length <= len(case.prompt_ids) <= length
    assert case.context_ids + case.question_ids == case.prompt_ids
    context, question = tok.decode(case.context_ids), tok.decode(case.question_ids)
    # the question is only in the part fed after compression; every expected answer is in the context
    assert case.question not in context and question.startswith(case.question)
    assert question.endswith("<|im_start|>assistant\n" + case.answer_prefix)
    assert case.expected and all(answer in context for answer in case.expected)
    assert not any(answer.lower() in (case.question + case.answer_prefix).lower() for answer in case.expected)


def test_family_shapes(smollm_tokenizer):
    tok = smollm_tokenizer
    counts = {f: len(_case(tok, f, 2048).expected) for f in FAMILIES}
    assert counts == {"niah_single": 1, "niah_multikey": 1, "niah_multivalue": 4, "niah_multiquery": 4, "vt": 5,
                      "cwe": 10, "fwe": 3, "qa": 1}
    context = tok.decode(_case(tok, "niah_multikey", 2048).context_ids)
    assert context.count("One of the special magic numbers for") == 4  # 3 distractor keys
    vt = _case(tok, "vt", 2048)
    context = tok.decode(vt.context_ids)
    value = vt.question.split("value ")[1].split(" ")[0]
    assert f"VAR {vt.expected[0]} = {value}" in context
    assert all(f"VAR {b} = VAR {a}" in context for a, b in zip(vt.expected, vt.expected[1:], strict=False))
    lines = tok.decode(_case(tok, "cwe", 4096).context_ids).split("\n")
    words = next(line for line in lines if line.startswith("1. ")).split()[1::2]  # "1. w 2. w ..."
    ranked = sorted(set(words), key=words.count, reverse=True)
    assert set(ranked[:10]) == set(_case(tok, "cwe", 4096).expected)
    assert words.count(ranked[0]) == 30 and words.count(ranked[10]) == 3
    fwe = _case(tok, "fwe", 4096)
    coded = tok.decode(fwe.context_ids).split("coded words. ")[1].split("\n")[0].split()
    ranked = sorted(set(coded), key=coded.count, reverse=True)
    assert ranked[0] == "..." and ranked[1:4] == list(fwe.expected)


def test_qa_is_a_cloze_on_one_book_paragraph(smollm_tokenizer):
    case = _case(smollm_tokenizer, "qa", 4096)
    (word,) = case.expected
    blanked = case.question.split('documents: "')[1].rstrip('"')
    assert BLANK in blanked and word.lower() not in blanked.lower()
    sentence = blanked.replace(BLANK, word)
    gold = [p for p in paragraphs() if sentence in p]
    assert len(gold) == 1 and gold[0] in smollm_tokenizer.decode(case.context_ids)
    assert len(cloze_candidates()) > 500
    assert case.metric == "string_match_part" and _case(smollm_tokenizer, "vt", 2048).metric == "string_match_all"


@pytest.mark.parametrize(
    ("family", "length", "match"),
    [("nope", 2048, "family='nope'"), ("cwe", 60, "context_tokens=60"), ("qa", 32768, "longer than the shipped book")],
)
def test_bad_arguments(smollm_tokenizer, family, length, match):
    with pytest.raises(ValueError, match=match):
        build_ruler_case(smollm_tokenizer, family, length)


# --- scoring -----------------------------------------------------------------------------


def test_string_match_all_gives_recall_of_the_expected_values():
    refs = ("1234567", "7654321", "1111111", "2222222")
    assert string_match_all(" 1234567, 7654321, 1111111 and 2222222.", refs) == 1.0
    assert string_match_all("1234567 and 7654321", refs) == 0.5
    assert string_match_all("I do not know.", refs) == 0.0
    assert string_match_all("  ABCDE\x00 fghij ", ("abcde", "FGHIJ")) == 1.0  # case-insensitive, control chars


def test_string_match_part_gives_full_credit_for_any_accepted_answer():
    assert string_match_part("the Shimbashi station", ("Shimbashi", "Shinbashi")) == 1.0
    assert string_match_part("Tokyo", ("Shimbashi", "Shinbashi")) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_case_score_exact_wrong_and_partial(smollm_tokenizer, family):
    case = _case(smollm_tokenizer, family, 1024)
    assert case.score(" " + ", ".join(case.expected) + ".") == 1.0
    assert case.score(" zzzz 0000000") == 0.0
    if len(case.expected) > 1:
        assert case.score(case.expected[0]) == pytest.approx(1 / len(case.expected))


def test_wilson_interval():
    low, high = wilson(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    with pytest.raises(ValueError, match="n=0"):
        wilson(0, 0)


def _row(family, setting, method, score, status="ok"):
    return {"suite": "ruler", "task": family, "setting": setting, "context_tokens": 2048, "method": method,
            "label": method, "budget": None, "bits": None, "status": status, "score": score, "correct": score == 1.0,
            "ratio": 1.0}


def test_summary_rows_per_family_setting_context_and_method():
    rows = [_row("vt", "in_prompt", "dense", s) for s in (1.0, 0.6, 0.0)] + [_row("qa", "in_prompt", "dense", 1.0)]
    rows.append({**_row("vt", "in_prompt", "subtok@0.1", None, status="unreachable")})
    by = {(r["family"], r["method"]): r for r in summarize(rows)}
    vt = by["vt", "dense"]
    assert (vt["cases"], vt["correct"], vt["score"]) == (3, 1, pytest.approx(1.6 / 3))
    assert (vt["ci_low"], vt["ci_high"]) == pytest.approx(wilson(1.6, 3))
    assert by["all", "dense"]["cases"] == 4 and by["all", "dense"]["score"] == pytest.approx(2.6 / 4)
    assert by["vt", "subtok@0.1"]["cases"] == 0 and by["vt", "subtok@0.1"]["status"] == "unreachable"
    (table,) = markdown_tables(rows)
    assert "| dense | — | 1.000 | 2k | 0.53 | 1.00 | 0.65 (" in table


# --- end to end on a tiny random model ---------------------------------------------------


def test_run_ruler_suite_every_family(tmp_path, tiny_chat_model, smollm_tokenizer):
    methods = [MethodSpec("dense"), MethodSpec("subtok", 0.75)]
    summary = run_ruler_suite(methods, tiny_chat_model, smollm_tokenizer, contexts=[320], cases=1,
                              ruler_max_new_tokens=3, out_dir=str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == len(FAMILIES) * 2 * 2
    assert all(r["status"] == "ok" and 0.0 <= r["score"] <= 1.0 and r["new_tokens"] <= 3 for r in rows)
    assert {r["task"] for r in rows} == set(FAMILIES) and {r["setting"] for r in rows} == {"in_prompt", "after"}
    assert len(summary) == (len(FAMILIES) + 1) * 2 * 2
    assert summary == json.loads((tmp_path / "ruler_summary.json").read_text())
    assert {s["family"] for s in summary} == {*FAMILIES, "all"} and {s["context"] for s in summary} == {320}
    assert "### ruler: question withheld until after compression" in (tmp_path / "results.md").read_text()


def test_cli_bench_suite_ruler(tmp_path, tiny_chat_model, smollm_tokenizer, monkeypatch, capsys):
    import hf_subtok.model_loading as loading
    from hf_subtok.cli import main

    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda *a, **k: (tiny_chat_model, smollm_tokenizer))
    for family in ("niah", "qa"):  # random weights never answer: keep their generation short
        monkeypatch.setitem(ruler.MAX_NEW_TOKENS, family, 4)
    argv = ["bench", "--suite", "ruler", "--contexts", "256", "--cases", "1", "--families", "niah_single,qa",
            "--methods", "dense,subtok@0.75", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "### ruler: question inside the compressed prompt" in out and "| subtok@0.75 | 0.75 |" in out
    with open(tmp_path / "ruler_summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert {(r["family"], r["setting"], r["method"]) for r in summary} == {
        (f, s, m) for f in ("niah_single", "qa", "all") for s in ("in_prompt", "after") for m in ("dense", "subtok@0.75")
    }
    for r in summary:
        assert r["context"] == "256" and r["cases"] == ("2" if r["family"] == "all" else "1")
        assert float(r["ci_low"]) <= float(r["score"]) <= float(r["ci_high"])


def test_cli_rejects_unknown_ruler_family(capsys):
    from hf_subtok.cli import main

    assert main(["bench", "--suite", "ruler", "--families", "niah,qa", "--methods", "dense"]) == 2
    assert "ruler families must be among" in capsys.readouterr().err


# --- the second perplexity text ----------------------------------------------------------


def test_legal_text_is_the_constitution():
    text = load_text("legal")
    assert text.startswith("We the People of the United States, in Order to form a more perfect Union")
    assert 20_000 <= len(text.encode()) <= 40_000 and text.isascii() and "\r" not in text
    assert "Article. VII." in text and not set(text.split("\n\n")) & set(load_text("ppl").split("\n\n"))


def test_ppl_case_picks_its_text(smollm_tokenizer, tmp_path):
    tok = smollm_tokenizer
    legal = build_ppl_case(tok, 2048, 512, text="legal")
    assert tok.decode(legal.prefix_ids).startswith("We the People")
    assert build_ppl_case(tok, 64, 16, text="book") == build_ppl_case(tok, 64, 16)
    path = tmp_path / "mine.txt"
    path.write_text("One two three four five six seven eight nine ten. " * 20)
    assert tok.decode(build_ppl_case(tok, 8, 8, text=str(path)).prefix_ids).startswith("One two")
    with pytest.raises(ValueError, match="text='wiki'"):
        build_ppl_case(tok, 8, 8, text="wiki")
