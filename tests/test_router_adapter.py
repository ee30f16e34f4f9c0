"""`RouterAdapter`: save/load round trips, Hub loading offline, push_to_hub, and refused files.

Loading by repo id goes through huggingface_hub exactly as users do (`from_pretrained(repo_id,
revision=...)` -> `hf_hub_download` / `snapshot_download`), against a Hugging Face cache laid out
in a temporary folder with `HF_HUB_OFFLINE=1` (refs/<branch or tag> -> snapshots/<commit>/ ->
blobs/). We chose the cache over a Hub-compatible server on loopback because the cache layout
is a stable, documented contract that every huggingface_hub release (1.x in one venv, 2.x in
the other) reads the same way, while a fake server would have to mimic the Hub's HTTP API
(redirects, ETag/commit headers, the tree listing), which changes between releases and would
test our imitation more than our code. What the server would add, the download itself, is
huggingface_hub's own code. `push_to_hub` runs for real up to the network calls: `create_repo`
and `upload_folder` are replaced by recorders, and the folder they would upload is checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi

from hf_subtok.routers import RouterAdapter, RouterConfig
from hf_subtok.scorers import ValueNormScorer
from hf_subtok.training import train_router
from tests.test_router_fixtures import (
    copy_folder,
    prefill_values,
    tiny_model,
    tiny_train_config,
    write_hub_cache,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smollm_tokenizer):
    """`(adapter, saved_folder)`: a router (+ LoRA) trained a few steps on a tiny Llama."""
    out = tmp_path_factory.mktemp("trained")
    summary = train_router(
        tiny_train_config(out), model=tiny_model(smollm_tokenizer), tokenizer=smollm_tokenizer
    )
    folder = Path(summary["router_dir"])
    return RouterAdapter.from_pretrained(folder), folder


@pytest.fixture
def model(smollm_tokenizer):
    return tiny_model(smollm_tokenizer)


def _decisions(adapter, model) -> list[torch.Tensor]:
    """Per layer, the group indices the router keeps for a prefill's tokens `[B, Hkv, T, K]`."""
    k = adapter.config.keep_groups
    return [
        adapter.group_scorer(i)
        .score_groups(keys, values, adapter.config.num_groups)
        .topk(k, dim=-1)
        .indices
        for i, (keys, values) in enumerate(prefill_values(model))
    ]


def test_saved_folder_layout(trained):
    _, folder = trained
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "lora",
        "router.safetensors",
    ]
    assert sorted(p.name for p in (folder / "lora").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))


def test_round_trip_gives_identical_decisions(trained, model, tmp_path):
    adapter, _ = trained
    adapter.save_pretrained(tmp_path / "again")
    loaded = RouterAdapter.from_pretrained(tmp_path / "again")
    assert loaded.config == adapter.config
    merged = adapter.apply_lora(tiny_model_like(model))
    for a, b in zip(_decisions(adapter, merged), _decisions(loaded, merged), strict=True):
        assert torch.equal(a, b)
    keys, values = prefill_values(merged)[1]
    from hf_subtok.scorers import Observation

    observation = Observation(
        torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(0)), None, 0.25
    )
    torch.testing.assert_close(
        adapter.token_scorer(1).score_tokens(keys, values, observation),
        loaded.token_scorer(1).score_tokens(keys, values, observation),
        rtol=0,
        atol=0,
    )
    for name, tensor in adapter.lora.tensors.items():
        assert torch.equal(tensor, loaded.lora.tensors[name])


def tiny_model_like(model):
    import copy

    return copy.deepcopy(model)


def test_trained_router_decides_differently_from_value_norm(trained, model):
    adapter, _ = trained
    merged = adapter.apply_lora(model)
    changed = total = 0
    for i, (keys, values) in enumerate(prefill_values(merged)):
        k = adapter.config.keep_groups
        learned = (
            adapter.group_scorer(i)
            .score_groups(keys, values, 4)
            .topk(k, dim=-1)
            .indices.sort(-1)
            .values
        )
        norm = (
            ValueNormScorer().score_groups(keys, values, 4).topk(k, dim=-1).indices.sort(-1).values
        )
        changed += int((learned != norm).any(-1).sum())
        total += learned[..., 0].numel()
    assert changed > 0.01 * total, (
        f"the trained router picks the value-norm groups for {total - changed}/{total} tokens"
    )


def test_lora_is_a_standard_peft_adapter(trained, model):
    from peft import PeftModel

    adapter, folder = trained
    ids = torch.randint(3, 200, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        peft_logits = (
            PeftModel.from_pretrained(tiny_model_like(model), folder / "lora").eval()(ids).logits
        )
        merged_logits = adapter.apply_lora(tiny_model_like(model))(ids).logits
        base_logits = model(ids).logits
    torch.testing.assert_close(peft_logits, merged_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base_logits, merged_logits, atol=1e-4), (
        "the trained LoRA changes the model"
    )


# --- loading by repo id from the Hugging Face cache, offline ---

COMMIT_OLD, COMMIT_NEW = "1" * 40, "2" * 40


@pytest.fixture
def hub_cache(trained, model, tmp_path, monkeypatch):
    """A Hub cache holding `org/tiny-router` at two commits: `main` (trained) and tag `v0` (untrained)."""
    _, folder = trained
    untrained = RouterAdapter(
        RouterConfig.for_model(model, num_groups=4, keep_groups=2, budget=0.8)
    )
    untrained.save_pretrained(tmp_path / "untrained")
    cache_dir = tmp_path / "hub"
    write_hub_cache(
        cache_dir,
        "org/tiny-router",
        {COMMIT_OLD: tmp_path / "untrained", COMMIT_NEW: folder},
        {"main": COMMIT_NEW, "v0": COMMIT_OLD},
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache_dir


def test_load_by_repo_id_offline(trained, model, hub_cache):
    adapter, _ = trained
    loaded = RouterAdapter.from_pretrained("org/tiny-router")
    for a, b in zip(_decisions(adapter, model), _decisions(loaded, model), strict=True):
        assert torch.equal(a, b)
    explicit = RouterAdapter.from_pretrained(
        "org/tiny-router", revision="main", cache_dir=hub_cache
    )
    assert explicit.config == adapter.config


@pytest.mark.parametrize("revision", ["v0", COMMIT_OLD])
def test_load_an_older_revision(trained, hub_cache, revision):
    old = RouterAdapter.from_pretrained("org/tiny-router", revision=revision)
    assert old.lora is None and old.config.lora_r == 0 and old.config != trained[0].config


def test_unknown_repo_or_revision_offline_is_a_clear_error(hub_cache):
    with pytest.raises(ValueError, match="router 'org/no-such-router' could not be found"):
        RouterAdapter.from_pretrained("org/no-such-router")
    with pytest.raises(ValueError, match="at revision 'v9' could not be found"):
        RouterAdapter.from_pretrained("org/tiny-router", revision="v9")


def test_push_to_hub_uploads_the_saved_folder(trained, model, tmp_path, monkeypatch):
    adapter, _ = trained
    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        uploaded["created"] = repo_id
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded.update(
            repo_id=repo_id,
            folder=copy_folder(Path(folder_path), tmp_path / "uploaded"),
            kwargs=kwargs,
        )
        return f"https://huggingface.co/{repo_id}/commit/{'3' * 40}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = adapter.push_to_hub("org/tiny-router")
    assert (
        url.endswith("3" * 40) and uploaded["created"] == uploaded["repo_id"] == "org/tiny-router"
    )
    folder = uploaded["folder"]
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "README.md",
        "config.json",
        "lora/adapter_config.json",
        "lora/adapter_model.safetensors",
        "router.safetensors",
    ]
    card = huggingface_hub.ModelCard.load(folder / "README.md")
    assert card.data.library_name == "hf-subtok"
    assert "kv-cache-compression" in card.data.tags
    assert card.data.to_dict()["hf_subtok"]["budget"] == adapter.config.budget
    assert 'RouterAdapter.from_pretrained("org/tiny-router")' in card.text
    assert RouterAdapter.from_pretrained(folder).config == adapter.config


# --- refused files ---


@pytest.fixture
def saved(trained, tmp_path) -> Path:
    return copy_folder(trained[1], tmp_path / "router")


def test_corrupt_weights_are_refused(saved):
    (saved / "router.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="router.safetensors is not a readable safetensors file"):
        RouterAdapter.from_pretrained(saved)


def test_truncated_weights_are_refused(saved):
    data = (saved / "router.safetensors").read_bytes()
    (saved / "router.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        RouterAdapter.from_pretrained(saved)


def test_truncated_lora_is_refused(saved):
    path = saved / "lora" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(
        ValueError, match="adapter_model.safetensors is not a readable safetensors file"
    ):
        RouterAdapter.from_pretrained(saved)


@pytest.mark.parametrize("field", ["head_dim", "base_fingerprint", "budget"])
def test_missing_config_field_is_refused(saved, field):
    config = json.loads((saved / "config.json").read_text())
    del config[field]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"missing the field\\(s\\) \\['{field}'\\]"):
        RouterAdapter.from_pretrained(saved)


def test_bad_config_values_are_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "keep_groups": 9}))
    with pytest.raises(ValueError, match="keep_groups must be in 1..4, got 9"):
        RouterAdapter.from_pretrained(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RouterAdapter.from_pretrained(saved)


@pytest.mark.parametrize("name", ["router.bin", "router.pt", "lora/adapter_model.bin"])
def test_pickle_in_place_of_safetensors_is_refused(saved, name):
    target = saved / name
    target.with_suffix(".safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, target)
    with pytest.raises(ValueError, match=r"pickle file\(s\).*hf-subtok loads safetensors only"):
        RouterAdapter.from_pretrained(saved)


def test_missing_lora_is_refused(saved):
    import shutil

    shutil.rmtree(saved / "lora")
    with pytest.raises(
        ValueError, match="lora is missing: config.json says the router was trained with a LoRA"
    ):
        RouterAdapter.from_pretrained(saved)


# --- the base model's identity ---


def test_mismatched_base_model_is_refused(trained, smollm_tokenizer):
    adapter, _ = trained
    with pytest.raises(
        ValueError, match=r"does not fit this model: weights: .* weight norms differ"
    ):
        adapter.check_model(tiny_model(smollm_tokenizer, seed=1))
    with pytest.raises(ValueError, match="num_layers: router 2, model 3"):
        adapter.apply_lora(tiny_model(smollm_tokenizer, num_hidden_layers=3))
    with pytest.raises(ValueError, match="head_dim: router 16, model 32"):
        adapter.check_model(tiny_model(smollm_tokenizer, head_dim=32))
    with pytest.raises(ValueError, match="num_kv_heads: router 2, model 4"):
        adapter.check_model(tiny_model(smollm_tokenizer, num_key_value_heads=4))


def test_the_base_model_in_another_dtype_and_with_the_lora_merged_still_fits(trained, model):
    adapter, _ = trained
    adapter.check_model(tiny_model_like(model).to(torch.bfloat16))
    adapter.check_model(adapter.apply_lora(tiny_model_like(model)))


# --- atomic saves ---


def test_failed_save_leaves_no_half_written_checkpoint(trained, tmp_path, monkeypatch):
    import hf_subtok.routers.adapter as adapter_module

    adapter, _ = trained

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(adapter_module, "render_card", fail)  # after the weights were written
    with pytest.raises(RuntimeError, match="disk full"):
        adapter.save_pretrained(tmp_path / "new")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    adapter.save_pretrained(tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir() if p.is_file()}
    monkeypatch.setattr(adapter_module, "render_card", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        adapter.save_pretrained(tmp_path / "old")
    assert os.listdir(tmp_path) == ["old"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir() if p.is_file()} == before
