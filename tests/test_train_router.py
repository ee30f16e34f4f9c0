"""`hf-subtok train-router` on a tiny model: progress, checkpoints, resume, held-out eval, card."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hf_subtok import cli
from hf_subtok.routers import RouterAdapter
from tests.test_router_fixtures import tiny_model

TINY = [
    "--seq-len",
    "96",
    "--eval-len",
    "32",
    "--dense-window",
    "8",
    "--num-groups",
    "4",
    "--budget",
    "0.8",
    "--checkpoint-every",
    "2",
    "--router-lr",
    "0.03",
    "--lr",
    "0.003",
]
TINY_EVAL = [
    "--eval-prefix",
    "200",
    "--eval-tokens",
    "32",
    "--needle-lengths",
    "300",
    "--needle-depths",
    "0.5",
    "--window",
    "8",
    "--evict-budget",
    "0.4",
]


@pytest.fixture
def tiny_loader(monkeypatch, smollm_tokenizer):
    """Every `load_model_and_tokenizer` call returns a fresh tiny Llama (the same weights each time)."""
    import hf_subtok.model_loading as loading

    calls = []

    def load(model=None, **kwargs):
        calls.append(model)
        return tiny_model(smollm_tokenizer), smollm_tokenizer

    monkeypatch.setattr(loading, "load_model_and_tokenizer", load)
    return calls


def _run(argv, capsys):
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_train_router_trains_evaluates_and_writes_the_card(tmp_path, capsys, tiny_loader):
    out = tmp_path / "out"
    status, stdout, stderr = _run(
        ["train-router", "--out", str(out), "--steps", "4", *TINY, *TINY_EVAL], capsys
    )
    assert status == 0, stderr
    assert tiny_loader == [None]  # the default model
    assert "hf-subtok train-router" in stderr and "4/4" in stderr  # tqdm progress
    assert "hf-subtok held-out eval" in stderr
    for method in (
        "dense",
        "value_norm@K=2/4",
        "learned@K=2/4",
        "value_norm+lora@K=2/4",
        "snapkv+value_norm@0.4",
        "learned_selector+router@0.4",
    ):
        assert f"| {method} |" in stdout
    metrics = json.loads((out / "eval.json").read_text())
    rows = {row["method"]: row for row in metrics["rows"]}
    assert rows["learned@K=2/4"]["ratio"] == rows["value_norm@K=2/4"]["ratio"] <= 0.8
    assert rows["learned@K=2/4"]["needle_total"] == 1
    card = (out / "router" / "README.md").read_text()
    assert "library_name: hf-subtok" in card and "| learned@K=2/4 |" in card
    assert f"{rows['learned@K=2/4']['ppl']:.3f}" in card
    loaded = RouterAdapter.from_pretrained(out / "router")
    assert loaded.config.metrics == metrics and loaded.config.training["steps"] == 4
    assert (out / "checkpoint" / "state.safetensors").is_file()


def test_resume_continues_exactly_where_the_checkpoint_stopped(
    tmp_path, capsys, caplog, tiny_loader
):
    caplog.set_level(logging.INFO, logger="hf_subtok")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert (
        _run(["train-router", "--out", str(straight), "--steps", "4", "--no-eval", *TINY], capsys)[
            0
        ]
        == 0
    )
    assert (
        _run(["train-router", "--out", str(split), "--steps", "2", "--no-eval", *TINY], capsys)[0]
        == 0
    )
    status, _, _ = _run(
        ["train-router", "--out", str(split), "--steps", "4", "--no-eval", "--resume", *TINY],
        capsys,
    )
    assert status == 0 and "Resuming from step 2" in caplog.text
    a = load_file(straight / "router" / "router.safetensors")
    b = load_file(split / "router" / "router.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    a = load_file(straight / "router" / "lora" / "adapter_model.safetensors")
    b = load_file(split / "router" / "lora" / "adapter_model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_existing_checkpoint_needs_resume_and_the_same_settings(tmp_path, capsys, tiny_loader):
    out = str(tmp_path / "out")
    assert _run(["train-router", "--out", out, "--steps", "2", "--no-eval", *TINY], capsys)[0] == 0
    status, _, stderr = _run(
        ["train-router", "--out", out, "--steps", "3", "--no-eval", *TINY], capsys
    )
    assert status == 2 and "already holds a checkpoint; pass --resume" in stderr
    status, _, stderr = _run(
        [
            "train-router",
            "--out",
            out,
            "--steps",
            "3",
            "--no-eval",
            "--resume",
            *TINY,
            "--budget",
            "0.7",
        ],
        capsys,
    )
    assert (
        status == 2
        and "settings ['budget'] differ" in stderr
        and len(stderr.strip().splitlines()) == 1
    )


def test_text_file_and_model_option(tmp_path, capsys, caplog, tiny_loader):
    caplog.set_level(logging.INFO, logger="hf_subtok")
    text = tmp_path / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    status, _, _ = _run(
        [
            "train-router",
            "--out",
            str(tmp_path / "o"),
            "--steps",
            "1",
            "--no-eval",
            "--model",
            "some/model",
            "--text",
            str(text),
            *TINY,
        ],
        capsys,
    )
    assert status == 0 and tiny_loader == ["some/model"] and str(text) in caplog.text


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--text", "/no/such/corpus.txt"], "text='/no/such/corpus.txt' cannot be read"),
        (["--steps", "0"], "steps must be an integer >= 1, got 0"),
        (["--eval-len", "90"], "seq_len - eval_len = 6 must exceed dense_window + 4 = 12"),
        (["--budget", "1.5"], "budget must be in (0, 1], got 1.5"),
        (["--needle-depths", "0.5,2"], "needle-depths must be in [0, 1], got 2.0"),
        (["--budget", "0.3"], "budget=0.3 is below"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, tiny_loader, extra, match):
    status, _, stderr = _run(
        ["train-router", "--out", str(tmp_path / "o"), "--steps", "1", *TINY, *extra], capsys
    )
    assert status == 2
    assert len(stderr.strip().splitlines()) == 1 and match in stderr, stderr
    assert not Path(tmp_path / "o" / "checkpoint").exists()


@pytest.mark.slow
def test_train_router_on_the_real_model(tmp_path, capsys):
    status, stdout, stderr = _run(
        [
            "--threads",
            "2",
            "train-router",
            "--out",
            str(tmp_path / "o"),
            "--steps",
            "2",
            "--no-eval",
        ],
        capsys,
    )
    assert status == 0, stderr
    loaded = RouterAdapter.from_pretrained(tmp_path / "o" / "router")
    assert loaded.config.base_model == "smollm2-135m-instruct" and loaded.config.keep_groups == 2
