"""Training text as token windows: deterministic per (seed, step), so a resumed run sees the same data."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from hf_subtok.tasks import load_text

DEFAULT_TEXT = "haystack"  # shipped text the router trains on; held-out perplexity uses "ppl"


def read_training_text(path: str | None) -> tuple[str, str]:
    """`(text, source)`: the file at `path`, or the shipped `DEFAULT_TEXT` when None."""
    if path is None:
        return load_text(DEFAULT_TEXT), f"shipped text {DEFAULT_TEXT!r}"
    try:
        return Path(path).read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"text={str(path)!r} cannot be read: {e}") from None


class TokenWindows:
    """Random `[B, T]` windows of one token stream."""

    def __init__(self, token_ids: list[int], seq_len: int, batch_size: int, seed: int):
        if len(token_ids) < seq_len + 1:
            raise ValueError(
                f"text has {len(token_ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
            )
        self.tokens = torch.tensor(token_ids, dtype=torch.long)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed

    def batch(self, step: int) -> torch.Tensor:
        """The `[B, T]` windows of training step `step` (the same on every run)."""
        rng = random.Random(self.seed * 1_000_003 + step)
        starts = [
            rng.randrange(len(self.tokens) - self.seq_len + 1) for _ in range(self.batch_size)
        ]
        return torch.stack([self.tokens[s : s + self.seq_len] for s in starts])  # [B, T]
