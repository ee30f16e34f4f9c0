"""`hf-subtok calibrate`: runs on a tiny model (and on the real one, slow) and writes the artifact."""

from __future__ import annotations

import pytest

from hf_subtok import cli
from hf_subtok.rank import RankBases


@pytest.fixture
def tiny_loader(monkeypatch, tiny_chat_model, smollm_tokenizer):
    """Make every `load_model_and_tokenizer` call return the tiny model."""
    import hf_subtok.model_loading as loading

    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda model=None, **kw: (tiny_chat_model, smollm_tokenizer))


def test_calibrate_writes_the_artifact(capsys, tiny_loader, tiny_chat_model, tmp_path):
    argv = ["calibrate", "--out", str(tmp_path / "bases"), "--tokens", "256", "--window", "128", "--held-out", "128", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out relative error" in out and "keys_post_centred" in out
    bases = RankBases.from_pretrained(tmp_path / "bases")
    bases.check_model(tiny_chat_model)
    assert bases.config.calibration["text"] == "shipped text 'haystack'" and bases.config.calibration["tokens"] == 256


def test_calibrate_reads_a_file_and_refuses_a_bad_text(capsys, tiny_loader, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("A user's own text, repeated until it is long enough. " * 60, encoding="utf-8")
    argv = ["calibrate", "--out", str(tmp_path / "b"), "--text", str(text), "--tokens", "128", "--window", "64",
            "--held-out", "0", "--no-center", "--key-space", "pre_rope", "--no-progress"]
    assert cli.main(argv) == 0
    assert "keys pre_rope" in capsys.readouterr().out
    bases = RankBases.from_pretrained(tmp_path / "b")
    assert bases.config.key_space == "pre_rope"
    assert not bases.config.centered and bases.layer(0).key_mean is None and bases.config.metrics == {}
    capsys.readouterr()
    assert cli.main(["calibrate", "--out", str(tmp_path / "c"), "--text", "no-such-text"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "neither a shipped text" in err


@pytest.mark.slow
def test_calibrate_the_real_model(capsys, tmp_path, smollm):
    argv = ["calibrate", "--out", str(tmp_path / "smollm2"), "--tokens", "512", "--window", "256", "--held-out", "256", "--no-progress"]
    assert cli.main(argv) == 0
    bases = RankBases.from_pretrained(tmp_path / "smollm2")
    bases.check_model(smollm[0])
    assert (bases.config.num_layers, bases.config.num_kv_heads, bases.config.head_dim) == (30, 3, 64)
    errors = bases.config.metrics["relative_error"]["keys_post_centred"]
    assert errors["8"] > errors["16"] > errors["32"]
