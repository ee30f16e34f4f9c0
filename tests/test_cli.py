"""The `hf-subtok` command line: errors are one line with exit status 2; commands print results.

Model loading is replaced by a tiny random Llama with the real tokenizer, except in the
console-script test, which runs the installed entry point in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from hf_subtok import cli


@pytest.fixture
def tiny_loader(monkeypatch, tiny_chat_model, smollm_tokenizer):
    """Make every `load_model_and_tokenizer` call return the tiny model."""
    import hf_subtok.model_loading as loading

    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda model=None, **kw: (tiny_chat_model, smollm_tokenizer))


def _one_line_error(capsys, argv, match):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["bench", "--suite", "needle,nope"], "suite must be one of needle, ppl, speed, ruler, memory, throughput, got 'nope'"),
        (["bench", "--methods", "dense,magic"], "method must be one of dense, subtok, kvpress"),
        (["bench", "--methods", "kvpress:nope"], "got 'nope'"),
        (["bench", "--budgets", "0.5,1.5"], "budget must be in (0, 1], got 1.5"),
        (["bench", "--budgets", "0"], "budget must be in (0, 1], got 0"),
        (["bench", "--lengths", "1k,x"], "lengths must be integers"),
        (["generate", "--prompt", "hi", "--budget", "1.5"], "budget must be in (0, 1], got 1.5"),
        (["generate", "--prompt", "hi", "--keep-groups", "9"], "keep_groups must be in 1..8, got 9"),
        (["generate", "--file", "/no/such/file.txt"], "/no/such/file.txt"),
        (["generate"], "one of the arguments --prompt --file is required"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, match):
    _one_line_error(capsys, argv, match)


@pytest.mark.parametrize("command", ["bench", "demo", "generate"])
def test_bad_model_path_is_one_line_and_exit_2(capsys, tmp_path, command):
    argv = [command, "--model", str(tmp_path / "no-such-model")]
    if command == "generate":
        argv += ["--prompt", "hi"]
    if command == "bench":
        argv += ["--out", str(tmp_path / "out"), "--methods", "dense"]
    _one_line_error(capsys, argv, "could not be loaded")


def test_console_script_error_in_a_real_process():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from hf_subtok.cli import main; sys.exit(main())", "bench", "--suite", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["hf-subtok: error: suite must be one of needle, ppl, speed, ruler, memory, throughput, got 'nope'"]


def test_generate_prints_answer_and_memory_report(capsys, tiny_loader):
    argv = ["generate", "--prompt", "Tell me a story. " * 30, "--num-groups", "4", "--keep-groups", "2", "--window", "8",
            "--max-new-tokens", "5"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "memory: stored" in out and "keep 2 of 4 value groups" in out and "tokens/s" in out


def test_generate_reads_a_file(capsys, tiny_loader, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("What is the capital of France?")
    assert cli.main(["generate", "--file", str(prompt), "--budget", "0.5", "--max-new-tokens", "3"]) == 0
    assert "ratio" in capsys.readouterr().out


def test_bench_quick_flag_prints_the_table(capsys, tiny_loader, tmp_path):
    argv = ["bench", "--quick", "--methods", "dense,subtok", "--budgets", "0.5", "--suite", "needle",
            "--lengths", "300", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| dense | — | 1.000 |" in out and "subtok@0.5" in out
    assert (tmp_path / "results.json").exists() and (tmp_path / "quality_vs_ratio.png").exists()
