"""`hf-subtok scoreboard`: its steps are valid bench commands, and their tables land between the
markers of the target file, replacing only the steps that ran."""

from __future__ import annotations

import pytest

from hf_subtok.bench import scoreboard
from hf_subtok.bench.kvpress_methods import kvpress_version
from hf_subtok.bench.scoreboard import (
    SCOREBOARD_END,
    SCOREBOARD_START,
    STEPS,
    Step,
    run_scoreboard,
    step_argv,
)
from hf_subtok.cli import bench_config_from_args, build_parser, main

HAVE_KVPRESS = kvpress_version() is not None


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.name)
def test_every_step_is_a_bench_command_of_its_grid(tmp_path, step):
    argv = step_argv(step, tmp_path, have_kvpress=HAVE_KVPRESS)
    config = bench_config_from_args(build_parser().parse_args(argv))
    assert str(config.out_dir) == str(tmp_path / step.name)
    families = {m.family for m in config.methods}
    assert {"dense", "subtok"} <= families or "memory" in step.name or "throughput" in step.name
    assert ("kvpress" in families) == (HAVE_KVPRESS and "kvpress" in " ".join(step.argv))
    if "needle" in config.suites:  # headline cells: at least 48 cases per row, both settings
        assert 2 * len(config.needle_seeds) * len(config.needle_depths) >= 48


def _fake_bench(calls: list[list[str]]):
    def run(argv: list[str]) -> str:
        calls.append(argv)
        out = argv[argv.index("--out") + 1]
        return f"| method | value |\n| --- | --- |\n| dense | {out.rsplit('/', 1)[-1]} run {len(calls)} |\n"

    return run


def test_tables_go_between_the_markers_and_a_partial_run_keeps_the_other_steps(tmp_path):
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\nIntro.\n\n## History\n\nOld notes.\n", encoding="utf-8")
    steps = [Step("one", "First table", ("--suite", "ppl")), Step("two", "Second table", ("--suite", "needle"))]
    calls: list[list[str]] = []
    run_scoreboard(steps, tmp_path / "out", target, _fake_bench(calls), have_kvpress=False)
    text = target.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nIntro.\n\n## Scoreboard\n")  # before the first section
    assert text.index("## Scoreboard") < text.index(SCOREBOARD_START)
    assert text.endswith(SCOREBOARD_END + "\n\n## History\n\nOld notes.\n")
    assert text.index("### First table") < text.index("### Second table")
    assert f"--out {tmp_path / 'out' / 'one'}" in text and "| dense | one run 1 |" in text
    assert "Commit " in text
    # the second step alone again: its table replaced, the first kept as it was
    run_scoreboard(steps[1:], tmp_path / "out", target, _fake_bench(calls), have_kvpress=False)
    text = target.read_text(encoding="utf-8")
    assert "| dense | one run 1 |" in text and "| dense | two run 3 |" in text
    assert "two run 2" not in text and text.count("### Second table") == 1
    assert text.index("### First table") < text.index("### Second table")
    assert text.endswith("## History\n\nOld notes.\n") and text.count(SCOREBOARD_START) == 1


def test_without_kvpress_the_press_rows_are_dropped_from_the_commands(tmp_path):
    step = next(s for s in STEPS if "kvpress" in " ".join(s.argv))
    argv = step_argv(step, tmp_path, have_kvpress=False)
    methods = argv[argv.index("--methods") + 1]
    assert "kvpress" not in methods and methods.startswith("dense,subtok")


def test_unknown_steps_are_refused_by_name(capsys):
    assert main(["scoreboard", "--only", "quality-float32,nope", "--list"]) == 2
    assert "unknown step(s) nope" in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_step_writes_the_benchs_own_table(tmp_path, monkeypatch):
    """One small step through the real bench on the embedded model: the table the bench printed
    is the one the scoreboard holds."""
    step = Step("ppl-small", "Perplexity, small", ("--suite", "ppl", "--ppl-prefix", "256", "--budgets", "0.5",
                                                   "--methods", "dense,subtok"))
    monkeypatch.setattr(scoreboard, "STEPS", (step,))
    target = tmp_path / "BENCHMARKS.md"
    assert main(["--threads", "1", "scoreboard", "--out", str(tmp_path / "out"), "--target", str(target)]) == 0
    text = target.read_text(encoding="utf-8")
    saved = (tmp_path / "out" / "ppl-small" / "results.md").read_text(encoding="utf-8")
    table = [line for line in saved.splitlines() if line.startswith("| dense")]
    assert table and all(line in text for line in table)
