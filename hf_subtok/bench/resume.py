"""Append-only store of finished benchmark cases, so an interrupted run resumes.

Every finished (case, method) row is appended as one JSON line to `cases.jsonl` in the
output folder and flushed at once. A later run with the same settings skips the rows whose
`key` (which includes the run id) is already there. A torn last line (a kill mid-write) is
ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

JSONL_NAME = "cases.jsonl"


def code_fingerprint() -> str:
    """Hash of the package's sources that shape results (everything but bench/, cli, demo).

    Rows computed by other code are not reused on resume.
    """
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith("bench/") or relative in ("cli.py", "demo.py"):
            continue
        digest.update(relative.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def run_id(settings: dict) -> str:
    """Short stable id of everything that changes a row's result (model, dtype, window, ...)."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class ResultStore:
    """Rows already finished in `folder/cases.jsonl`, and appending new ones."""

    def __init__(self, folder: str | Path, *, restart: bool = False):
        self.path = Path(folder) / JSONL_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if restart and self.path.exists():
            self.path.unlink()
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        with self.path.open() as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s:%d is not complete JSON (interrupted write?); ignored", self.path, number)
                    continue
                self.rows[row["key"]] = row
        if self.rows:
            logger.info("Resuming: %d finished rows in %s", len(self.rows), self.path)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def add(self, row: dict) -> None:
        """Record a finished row (it must have a `key`) durably."""
        self.rows[row["key"]] = row
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=_plain) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def skip_finished(ctx, key: str, spec, ours: dict[float, float]) -> bool:
    """True (and progress advanced) when `key` already finished in an earlier run.

    A finished subtok row also records its measured ratio in `ours`, so presses resumed later
    in the same case still match its stored bytes.
    """
    done = ctx.store.get(key)
    if done is None or done.get("status") == "error":
        return False
    if spec.is_plain_subtok and done.get("status") == "ok":
        ours[spec.budget] = done["ratio"]
    ctx.advance()
    return True
