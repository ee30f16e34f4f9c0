"""Safe files for Hub artifacts (routers, bases): safetensors only, checked on load, written atomically.

`write_files(folder, {name: writer})` saves one checkpoint's files into a folder the way
`PreTrainedModel.save_pretrained` does (other files in the folder stay), but each file atomically
and with nothing left behind by a failed or killed save; `json_writer` and `safetensors_writer`
make the writers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Staging folders of `write_files` inside the target folder; one left by a killed save is
# removed by the next save into that folder.
STAGING_PREFIX = ".hf-subtok-staging-"

Writer = Callable[[Path], None]
"""Writes one file at the path it is given (a path in a staging folder, never the final one)."""


def write_files(
    folder: str | os.PathLike, writers: Mapping[str, Writer], *, remove: Iterable[str] = ()
) -> None:
    """Write one checkpoint's files into `folder`, each atomically; every other file stays.

    Args:
        folder: the target folder (created when missing; `"."` works).
        writers: relative POSIX path (`"config.json"`, `"lora/adapter_model.safetensors"`) ->
            function writing that file at the path it is given. All of them write into one
            staging folder inside `folder` (same filesystem); only when every writer has
            returned is each file moved into place with `os.replace`, in the order of `writers`
            (put the file a loader reads first, e.g. `config.json`, last).
        remove: relative paths of files an earlier save wrote and this one does not (e.g. a
            LoRA adapter the new checkpoint lacks); deleted after the moves, and their folders
            with them when left empty.

    A writer that raises leaves `folder` as it was (a folder this call created is removed
    again). The staging folder is removed on success and on error; one left by a killed process
    (`.hf-subtok-staging-*`) is removed by the next `write_files` into the same folder, so two
    processes must not save into one folder at the same time.

    Raises:
        ValueError: a path in `writers` or `remove` is absolute, leaves `folder`, or is a
            staging name.
    """
    folder = Path(folder)
    names = [_relative(name) for name in writers]
    stale = [_relative(name) for name in remove]
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(STAGING_PREFIX + "*"):
        _remove(leftover)
    moved = False
    try:
        with tempfile.TemporaryDirectory(
            prefix=STAGING_PREFIX, dir=folder, ignore_cleanup_errors=True
        ) as staging:
            staging = Path(staging)
            for name, writer in zip(names, writers.values(), strict=True):
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                writer(staging / name)
                if not (staging / name).is_file():
                    raise ValueError(f"the writer of {name} wrote no file")
            moved = True
            for name in names:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / name, folder / name)
    finally:
        if not moved:
            for path in created:  # deepest first; a folder someone else filled stays
                with contextlib.suppress(OSError):
                    path.rmdir()
    for name in stale:
        target = folder / name
        if target.is_file() or target.is_symlink():
            target.unlink()
        parent = target.parent
        while parent != folder and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def json_writer(data, **dumps_kwargs) -> Writer:
    """A `write_files` writer of `data` as UTF-8 JSON (`indent=2` unless given)."""
    text = json.dumps(data, **{"indent": 2, **dumps_kwargs})

    def write(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    return write


def text_writer(text: str) -> Writer:
    """A `write_files` writer of `text` (UTF-8)."""

    def write(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    return write


def safetensors_writer(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Writer:
    """A `write_files` writer of `tensors` as a safetensors file (copied to the CPU, contiguous)."""
    from safetensors.torch import save_file

    def write(path: Path) -> None:
        cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        save_file(cpu, str(path), metadata={"format": "pt", **(metadata or {})})

    return write


def _relative(name: str) -> str:
    path = PurePosixPath(name)
    if (
        not path.parts
        or path.is_absolute()
        or ".." in path.parts
        or "\\" in name
        or path.parts[0].startswith(STAGING_PREFIX)
    ):
        raise ValueError(f"file names must be relative paths inside the folder, got {name!r}")
    return str(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


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


def hub_folder(
    model_id: str,
    *,
    revision: str | None,
    cache_dir,
    force_download: bool,
    local_files_only: bool,
    token,
    kind: str,
) -> Path:
    """The local folder of an artifact: `model_id` itself when it is a folder, else the snapshot of
    that Hub repo (`revision`: branch, tag or commit; offline: from the cache only).

    Raises `ValueError` for a `revision` given with a local folder (a folder has no revisions)
    or a repo/revision that cannot be found, naming the `kind` of artifact ("router", "bases").
    """
    if os.path.isdir(model_id):
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} was given, but {model_id!r} is a local folder, which has "
                "no revisions; check out that revision into the folder, or pass a Hub repo id"
            )
        return Path(model_id)
    from huggingface_hub import constants, snapshot_download

    try:
        folder = snapshot_download(
            repo_id=model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            # offline, some huggingface_hub releases still list the repo for a commit revision
            local_files_only=local_files_only or constants.HF_HUB_OFFLINE,
            token=token,
        )
    except OSError as e:  # huggingface_hub's not-found errors (offline cache misses included)
        where = f"{model_id!r}" + (f" at revision {revision!r}" if revision else "")
        raise ValueError(f"{kind} {where} could not be found: {type(e).__name__}: {e}") from None
    return Path(folder)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final`, on error it is removed.

    `final` is never half-written: it is either absent, the previous folder, or the new one. The
    whole folder is replaced, so use it for folders the caller owns (training checkpoints);
    `write_files` saves into a user's folder. Temporary folders a killed save left beside
    `final` are removed first.
    """
    final = Path(final).absolute()
    if final.name in ("", ".", ".."):
        raise ValueError(f"atomic_directory needs a named folder, got {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    for prefix in (f".{final.name}.tmp-", f".{final.name}.old-"):  # left by a killed save
        for leftover in final.parent.glob(prefix + "*"):
            _remove(leftover)
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
