"""Safe files for router checkpoints: safetensors only, checked on load, written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def refuse_pickles(folder: Path) -> None:
    """Raise `ValueError` if `folder` (recursively) holds a pickle-format weight file."""
    pickles = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES
    )
    if pickles:
        raise ValueError(
            f"{folder} holds pickle file(s) {pickles}; hf-subtok loads safetensors only "
            "(pickle files can run code when loaded)"
        )


def read_json(path: Path) -> dict:
    """Parse a JSON file; `ValueError` names the file when it is missing or not valid JSON."""
    if not path.is_file():
        raise ValueError(f"{path.name} is missing from {path.parent}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def load_tensors(
    path: Path, expected: dict[str, torch.Size] | None = None
) -> dict[str, torch.Tensor]:
    """Load a safetensors file; with `expected`, its names and shapes must be exactly those.

    Raises `ValueError` for a missing, truncated or corrupt file, for NaN/inf values, and for
    missing, unknown or misshaped tensors, naming the file and the tensor.
    """
    if not path.is_file():
        raise ValueError(f"{path.name} is missing from {path.parent} (weights must be safetensors)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file (corrupt or truncated): {e}"
        ) from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {name!r} holds NaN or infinite values")
    if expected is None:
        return tensors
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise ValueError(
            f"{path} does not match the config: missing tensors {missing[:5]}, unknown {unknown[:5]}"
        )
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}"
            )
    return tensors


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final`, on error it is removed.

    `final` is never half-written: it is either absent, the previous folder, or the new one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and some writers make private files
            path.chmod(0o755 if path.is_dir() else 0o644)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
