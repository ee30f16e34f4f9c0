"""Helpers of the router tests (no tests here): a tiny model, a short training config, a Hub cache layout."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from tests.tiny_models import make_tiny_model


def tiny_model(tokenizer, seed: int = 0, **overrides):
    """A tiny random Llama for the real tokenizer (head_dim 16, 2 KV heads, 2 layers)."""
    model = make_tiny_model(
        "llama", seed=seed, **{"vocab_size": len(tokenizer), "head_dim": 16, **overrides}
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def tiny_train_config(out: Path, **overrides):
    """A `TrainConfig` that trains a tiny model in about a second (no held-out eval)."""
    from hf_subtok.training import EvalConfig, TrainConfig

    settings = dict(
        out=str(out),
        steps=6,
        seq_len=96,
        eval_len=32,
        dense_window=8,
        num_groups=4,
        budget=0.8,
        obs_window=8,
        checkpoint_every=3,
        router_lr=3e-2,
        lr=3e-3,
        evaluate=False,
        eval=EvalConfig(
            ppl_prefix=200,
            ppl_eval=32,
            needle_lengths=(300,),
            needle_depths=(0.5,),
            window=8,
            evict_budget=0.4,
        ),
    )
    return TrainConfig(**{**settings, **overrides})


def prefill_values(
    model, tokens: int = 64, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer `([B, Hkv, T, D] keys, values)` of a dense prefill of random tokens."""
    from transformers import DynamicCache

    ids = torch.randint(3, 200, (1, tokens), generator=torch.Generator().manual_seed(seed))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def write_hub_cache(
    cache_dir: Path, repo_id: str, commits: dict[str, Path], refs: dict[str, str]
) -> Path:
    """Lay out `cache_dir` as huggingface_hub's cache holds a downloaded model repo.

    `commits` maps a 40-hex commit to a folder whose files that commit holds; `refs` maps a
    branch or tag name to a commit. Files live once in `blobs/` (named by content hash) and
    the snapshots link to them, as `hf_hub_download` leaves them.
    """
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for commit, folder in commits.items():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            if not blob.exists():
                blob.write_bytes(data)
            link = repo / "snapshots" / commit / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            depth = (
                len(path.relative_to(folder).parts) + 1
            )  # snapshots/<commit>/... back to the repo
            link.symlink_to(Path(*[".."] * depth) / "blobs" / blob.name)
    for name, commit in refs.items():
        ref = repo / "refs" / name
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    return repo


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
