"""`RankBases` as a Hub artifact: round trip, the base model's identity checked, malformed files refused,
nothing half-written."""

from __future__ import annotations

import json
import os

import pytest
import torch

import hf_subtok.rank.artifact as artifact_module
from hf_subtok.rank import RankBases
from tests.rank_cases import random_model_bases
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def _bases(model, seed: int = 0) -> RankBases:
    return random_model_bases(model, seed)


def test_round_trip(model, tmp_path):
    bases = _bases(model)
    bases.save_pretrained(tmp_path / "bases")
    assert sorted(os.listdir(tmp_path / "bases")) == ["README.md", "bases.safetensors", "config.json"]
    loaded = RankBases.from_pretrained(tmp_path / "bases")
    assert loaded.config == bases.config
    for name, tensor in bases.tensors.items():
        torch.testing.assert_close(loaded.tensors[name], tensor, rtol=0, atol=0)
    loaded.check_model(model)
    card = (tmp_path / "bases" / "README.md").read_text()
    assert "library_name: hf-subtok" in card and "RankBases.from_pretrained" in card
    assert loaded.nbytes() == 2 * 2 * (2 * 16 * 16 + 2 * 16) * 4  # L=2 x Hkv=2 x (two D=16 bases and means)
    layer = loaded.layer(1)
    torch.testing.assert_close(layer.key_basis, bases.tensors["key_basis"][1])
    with pytest.raises(ValueError, match="layer_idx must be in 0..1, got 2"):
        loaded.layer(2)


def test_another_model_is_refused(model, tmp_path):
    bases = _bases(model)
    with pytest.raises(ValueError, match=r"do not fit this model: weights: .* weight norms differ"):
        bases.check_model(make_tiny_model("llama", seed=1))
    with pytest.raises(ValueError, match="do not fit this model: model_type: bases 'llama', model 'qwen3'"):
        bases.check_model(make_tiny_model("qwen3"))
    with pytest.raises(ValueError, match="num_layers: bases 2, model 3"):
        bases.check_model(make_tiny_model("llama", num_hidden_layers=3))


def test_wrong_shape_is_refused(model, tmp_path):
    bases = _bases(model)
    wrong = dict(bases.tensors, key_mean=bases.tensors["key_mean"][:, :1])
    with pytest.raises(ValueError, match=r"tensor 'key_mean' has shape \(2, 1, 16\), expected \(2, 2, 16\)"):
        RankBases(bases.config, wrong)
    bases.save_pretrained(tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    config["head_dim"] = 32
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor 'key_basis' has shape \(2, 2, 16, 16\), expected \(2, 2, 32, 32\)"):
        RankBases.from_pretrained(tmp_path / "b")
    config["head_dim"], config["key_space"] = 16, "after_rope"
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"key_space must be one of \('post_rope', 'pre_rope'\), got 'after_rope'"):
        RankBases.from_pretrained(tmp_path / "b")
    del config["base_fingerprint"]
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing the field\(s\) \['base_fingerprint'\]"):
        RankBases.from_pretrained(tmp_path / "b")


def test_truncated_and_pickled_files_are_refused(model, tmp_path):
    _bases(model).save_pretrained(tmp_path / "b")
    weights = tmp_path / "b" / "bases.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        RankBases.from_pretrained(tmp_path / "b")
    weights.write_bytes(data)
    torch.save({"x": torch.zeros(1)}, tmp_path / "b" / "bases.bin")
    with pytest.raises(ValueError, match=r"pickle file\(s\) \['bases.bin'\]"):
        RankBases.from_pretrained(tmp_path / "b")
    (tmp_path / "b" / "bases.bin").unlink()
    assert RankBases.from_pretrained(tmp_path / "b").config.head_dim == 16
    with pytest.raises(ValueError, match="could not be found"):
        RankBases.from_pretrained("nobody/no-such-bases-here")


def test_a_failed_save_leaves_the_old_artifact(model, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifact_module, "render_card", fail)  # after the weights were staged
    with pytest.raises(RuntimeError, match="disk full"):
        _bases(model).save_pretrained(tmp_path / "new")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    _bases(model).save_pretrained(tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    monkeypatch.setattr(artifact_module, "render_card", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        _bases(model, seed=1).save_pretrained(tmp_path / "old")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
