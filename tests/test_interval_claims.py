"""A claim that one method beats another says whether the 95% intervals separate: `compare`, and
the "vs dense" column of the needle and RULER tables."""

from __future__ import annotations

import pytest

from hf_subtok.bench.intervals import compare, wilson
from hf_subtok.bench.report import needle_tables
from hf_subtok.bench.ruler_eval import markdown_tables


@pytest.mark.parametrize(
    "a, b, expected",
    [((24, 24), (0, 24), "above"), ((0, 24), (24, 24), "below"), ((12, 24), (13, 24), "overlap"),
     ((3, 3), (0, 3), "overlap"), ((2, 3), (1, 3), "overlap"), ((23, 24), (24, 24), "overlap")],  # 3 cases rank nothing
)
def test_compare_says_whether_the_intervals_separate(a, b, expected):
    assert compare(*a, *b) == expected
    # an independent reading of the same question: the intervals' bounds themselves
    (low_a, high_a), (low_b, high_b) = wilson(*a), wilson(*b)
    assert (expected == "overlap") == (low_a <= high_b and low_b <= high_a)


def _needle(method, correct: int, cases: int) -> list[dict]:
    return [{"suite": "needle", "setting": "after", "context_tokens": 2048, "method": method, "budget": 0.1,
             "status": "ok", "correct": i < correct, "ratio": 0.1} for i in range(cases)]


def test_needle_tables_say_where_a_row_stands_against_dense():
    rows = _needle("dense", 24, 24) + _needle("subtok@0.1", 23, 24) + _needle("tokens@0.1", 0, 24)
    (table,) = needle_tables(rows, {"after": "question withheld"})
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert lines["dense"].endswith("| — |")
    assert lines["subtok@0.1"].endswith("| overlap |") and "23/24" in lines["subtok@0.1"]
    assert lines["tokens@0.1"].endswith("| below |")


def _ruler(method, scores: list[float]) -> list[dict]:
    return [{"suite": "ruler", "task": "niah_single", "setting": "after", "context_tokens": 4096, "method": method,
             "label": method, "budget": None, "bits": None, "status": "ok", "score": s, "correct": s == 1.0,
             "ratio": 1.0} for s in scores]


def test_ruler_tables_say_where_a_row_stands_against_dense():
    rows = _ruler("dense", [1.0] * 12) + _ruler("subtok@0.25", [1.0] * 11 + [0.0]) + _ruler("tova@0.1", [0.0] * 12)
    (table,) = markdown_tables(rows)
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert lines["dense"].endswith("| — |")
    assert lines["subtok@0.25"].endswith("| overlap |") and lines["tova@0.1"].endswith("| below |")
