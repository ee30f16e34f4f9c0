"""Saving a router into a user's folder, and refusing configs and arguments that would load wrongly.

`save_pretrained` must behave like `PreTrainedModel.save_pretrained` for the files it does not
own (they stay) and be atomic for the ones it does (an error or a kill leaves the previous
checkpoint and no temporary files). The routers here are untrained (random weights) with a
small hand-made PEFT-format LoRA; what matters is that the bytes on disk are the expected ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_subtok.routers import LoraWeights, RouterAdapter, RouterConfig
from hf_subtok.routers.files import write_files
from tests.tiny_models import make_tiny_model

CHECKPOINT = ["README.md", "config.json", "lora", "router.safetensors"]
LORA_FILES = ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", head_dim=16)


def make_adapter(model, seed: int = 0, lora_r: int = 2) -> RouterAdapter:
    """An untrained router for `model` with random weights (and a LoRA of rank `lora_r`)."""
    config = RouterConfig.for_model(model, num_groups=4, keep_groups=2, budget=0.8, lora_r=lora_r)
    adapter = RouterAdapter(config, lora=_lora(seed, lora_r) if lora_r else None)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.modules.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return adapter


def _lora(seed: int, r: int) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed + 100)
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"]}
    tensors = {
        f"{name}.lora_A.weight": torch.randn(r, 64, generator=generator),
        f"{name}.lora_B.weight": torch.randn(64, r, generator=generator),
    }
    return LoraWeights(config, tensors)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) -> its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def same_router(a: RouterAdapter, b: RouterAdapter) -> bool:
    state_a, state_b = a.modules.state_dict(), b.modules.state_dict()
    lora_same = (a.lora is None and b.lora is None) or (
        a.lora is not None
        and b.lora is not None
        and all(torch.equal(t, b.lora.tensors[n]) for n, t in a.lora.tensors.items())
    )
    return (
        a.config == b.config
        and all(torch.equal(t, state_b[n]) for n, t in state_a.items())
        and lora_same
    )


# --- other files in the folder survive ---


def test_files_of_the_user_survive_a_save(model, tmp_path):
    folder = tmp_path / "router"
    (folder / "lora").mkdir(parents=True)
    (folder / "data").mkdir()
    foreign = {"notes.txt": b"my notes", "data/table.csv": b"a,b\n1,2\n", "lora/MY.md": b"x"}
    for name, data in foreign.items():
        (folder / name).write_bytes(data)
    first, second = make_adapter(model, seed=0), make_adapter(model, seed=1)
    first.save_pretrained(folder)
    second.save_pretrained(folder)
    files = snapshot(folder)
    assert {name: files[name] for name in foreign} == foreign
    assert set(files) == set(foreign) | {
        "README.md",
        "config.json",
        "router.safetensors",
        "lora/adapter_config.json",
        "lora/adapter_model.safetensors",
    }
    loaded = RouterAdapter.from_pretrained(folder)
    assert same_router(loaded, second) and not same_router(loaded, first)


def test_saving_without_lora_removes_the_earlier_adapter_only(model, tmp_path):
    folder = tmp_path / "router"
    make_adapter(model, lora_r=2).save_pretrained(folder)
    (folder / "lora" / "mine.txt").write_text("keep")
    make_adapter(model, lora_r=0).save_pretrained(folder)
    assert sorted(os.listdir(folder / "lora")) == ["mine.txt"]
    assert RouterAdapter.from_pretrained(folder).lora is None


def test_save_into_the_current_folder(model, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    (here / "keep.txt").write_text("mine")
    adapter = make_adapter(model)
    adapter.save_pretrained(".")
    assert sorted(os.listdir(here)) == sorted([*CHECKPOINT, "keep.txt"])
    assert sorted(os.listdir(here / "lora")) == LORA_FILES
    assert os.listdir(tmp_path) == ["here"]
    assert same_router(RouterAdapter.from_pretrained("."), adapter)


# --- a failed or killed save leaves the previous checkpoint and nothing else ---


@pytest.mark.parametrize("target", ["existing", "new/nested"])
def test_a_save_failing_midway_changes_nothing(model, tmp_path, monkeypatch, target):
    import hf_subtok.routers.adapter as adapter_module

    folder = tmp_path / target
    old = make_adapter(model, seed=0)
    if target == "existing":
        old.save_pretrained(folder)
        (folder / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    real_writer = adapter_module.safetensors_writer

    def failing_writer(tensors, metadata=None):
        write = real_writer(tensors, metadata)

        def half_then_fail(path):
            write(path)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            raise OSError(28, "No space left on device")

        return half_then_fail

    monkeypatch.setattr(adapter_module, "safetensors_writer", failing_writer)
    with pytest.raises(OSError, match="No space left"):
        make_adapter(model, seed=1).save_pretrained(folder)
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["existing"] if target == "existing" else []
    )
    if target == "existing":
        assert same_router(RouterAdapter.from_pretrained(folder), old)


KILLED_SAVE = textwrap.dedent(
    """
    import os, sys
    import safetensors.torch
    from hf_subtok.routers import RouterAdapter

    real = safetensors.torch.save_file

    def killed(tensors, filename, metadata=None):  # half a file written, then SIGKILL-like exit
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        os._exit(137)

    safetensors.torch.save_file = killed
    RouterAdapter.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
    """
)


def test_a_killed_save_leaves_nothing_once_the_next_save_ran(model, tmp_path):
    source, folder = tmp_path / "source", tmp_path / "router"
    old, new = make_adapter(model, seed=0), make_adapter(model, seed=1)
    new.save_pretrained(source)
    old.save_pretrained(folder)
    (folder / "notes.txt").write_text("mine")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(source), str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 137, proc.stderr
    # the killed save never replaced a checkpoint file: the old router still loads
    assert same_router(RouterAdapter.from_pretrained(folder), old)
    new.save_pretrained(folder)
    assert sorted(os.listdir(tmp_path)) == ["router", "source"]
    assert sorted(os.listdir(folder)) == sorted([*CHECKPOINT, "notes.txt"])
    assert sorted(os.listdir(folder / "lora")) == LORA_FILES
    assert same_router(RouterAdapter.from_pretrained(folder), new)


# --- the generic helper ---


def test_write_files_moves_only_after_every_writer_succeeded(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("old b")

    def fail(path):
        path.write_text("partial")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        write_files(tmp_path, {"a.txt": lambda p: p.write_text("new a"), "sub/b.txt": fail})
    assert snapshot(tmp_path) == {"a.txt": b"old a", "sub/b.txt": b"old b"}
    write_files(
        tmp_path,
        {"a.txt": lambda p: p.write_text("new a"), "c/d.txt": lambda p: p.write_text("d")},
        remove=["sub/b.txt", "never/written.txt"],
    )
    assert snapshot(tmp_path) == {"a.txt": b"new a", "c/d.txt": b"d"}
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "c"]  # sub/ was left empty: removed


@pytest.mark.parametrize(
    "name", ["../escape.txt", "/abs.txt", "a/../../b", ".hf-subtok-staging-x/f", "."]
)
def test_write_files_refuses_paths_outside_the_folder(tmp_path, name):
    with pytest.raises(ValueError, match="relative paths inside the folder"):
        write_files(tmp_path / "f", {name: lambda p: p.write_text("x")})
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "f").exists()


# --- configs that would load without their LoRA, or not as a mapping ---


@pytest.fixture
def saved(model, tmp_path) -> Path:
    make_adapter(model).save_pretrained(tmp_path / "router")
    return tmp_path / "router"


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


@pytest.mark.parametrize(
    "field",
    ["lora_r", "router_hidden", "selector", "selector_hidden", "format_version", "num_groups"],
)
def test_a_config_without_a_field_is_refused_naming_it(saved, field):
    _edit_config(saved, lambda c: {k: v for k, v in c.items() if k != field})
    with pytest.raises(ValueError, match=rf"config.json is missing the field\(s\) \['{field}'\]"):
        RouterAdapter.from_pretrained(saved)


def test_metrics_and_training_may_be_absent(saved):
    _edit_config(saved, lambda c: {k: v for k, v in c.items() if k not in ("metrics", "training")})
    assert RouterAdapter.from_pretrained(saved).lora is not None


@pytest.mark.parametrize("content", [[1, 2], "text", 3, None])
def test_a_config_that_is_not_an_object_is_refused(saved, content):
    (saved / "config.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match="config.json must hold a JSON object"):
        RouterAdapter.from_pretrained(saved)


def test_lora_files_with_lora_r_zero_are_refused(saved):
    _edit_config(saved, lambda c: {**c, "lora_r": 0})
    with pytest.raises(ValueError, match="lora_r=0 .* holds lora/adapter_model.safetensors"):
        RouterAdapter.from_pretrained(saved)


def test_lora_rank_must_match_the_adapter(saved):
    _edit_config(saved, lambda c: {**c, "lora_r": 4})
    with pytest.raises(ValueError, match="lora_r=4, but lora/adapter_config.json has r=2"):
        RouterAdapter.from_pretrained(saved)


# --- a local folder has no revisions ---


def test_revision_with_a_local_folder_is_refused(saved):
    with pytest.raises(ValueError, match="local folder, which has no revisions"):
        RouterAdapter.from_pretrained(saved, revision="v0")
    assert RouterAdapter.from_pretrained(saved, revision=None).lora is not None
