"""Token positions held as runs: what keys stored before RoPE need to be rotated at attention.

A cache keeps each row's tokens in position order (the prompt, then decode chunks; selection
keeps survivors ascending), so the positions of a row are a few runs of consecutive integers:
one run for a layer that never evicts, one per gap where tokens were evicted. `start[..., r]`
is the position of run r's first token and `length[..., r]` its tokens (0: padding, so that
every leading row has R runs). A run costs 8 bytes, against 4 per token for a position each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

POSITION_DTYPE = torch.int32
POSITION_RUN_BYTES = 8  # int32 start and int32 length


@dataclass(frozen=True)
class PositionRuns:
    """Positions `[..., T]` as runs: `start` and `length` `[..., R]` int32, each row's lengths
    summing to T."""

    start: torch.Tensor
    length: torch.Tensor

    def __post_init__(self):
        if self.start.dtype != POSITION_DTYPE or self.length.dtype != POSITION_DTYPE:
            raise ValueError(f"start and length must be {POSITION_DTYPE}, got {self.start.dtype} and {self.length.dtype}")
        if self.start.shape != self.length.shape:
            raise ValueError(f"start and length must have one shape, got {tuple(self.start.shape)} and {tuple(self.length.shape)}")

    @classmethod
    def of(cls, positions: torch.Tensor) -> PositionRuns:
        """The runs of `positions` `[..., T]` (integers, any order; a token opens a run unless it
        follows its predecessor by one). Reads the number of runs on the host: packs call it,
        a decode step that packs nothing does not."""
        *lead, tokens = positions.shape
        if tokens == 0:
            empty = positions.new_zeros(*lead, 0, dtype=POSITION_DTYPE)
            return cls(empty, empty.clone())
        positions = positions.to(POSITION_DTYPE)
        opens = torch.ones_like(positions, dtype=torch.bool)  # [..., T]: a token that opens a run
        opens[..., 1:] = positions[..., 1:] != positions[..., :-1] + 1
        run = opens.cumsum(-1).sub_(1)  # [..., T]: each token's run
        runs = int(run[..., -1].max()) + 1
        length = torch.zeros(*lead, runs, dtype=POSITION_DTYPE, device=positions.device)
        length.scatter_add_(-1, run, torch.ones_like(run, dtype=POSITION_DTYPE))
        start = torch.zeros(*lead, runs + 1, dtype=POSITION_DTYPE, device=positions.device)
        start.scatter_(-1, torch.where(opens, run, runs), positions)  # each run's first token; the rest to a spare column
        return cls(start[..., :runs].contiguous(), length)

    @classmethod
    def span(cls, first: int, tokens: int, lead: Sequence[int], device=None) -> PositionRuns:
        """Positions `first .. first + tokens - 1` in every leading row: one run each."""
        start = torch.full((*lead, 1), first, dtype=POSITION_DTYPE, device=device)
        return cls(start, torch.full_like(start, tokens))

    @property
    def tokens(self) -> int:
        """T, read on the host."""
        return int(self.length.sum(-1).max()) if self.length.numel() else 0

    def expand(self, tokens: int) -> torch.Tensor:
        """`[..., T]` int64 positions (T = `tokens`, each row's total: no host read)."""
        lead = self.start.shape[:-1]
        offset = self.length.cumsum(-1) - self.length  # [..., R]: tokens before each run
        base = (self.start - offset).long().flatten().repeat_interleave(
            self.length.flatten(), output_size=lead.numel() * tokens
        )  # [... * T]: start - offset of each token's run
        return base.view(*lead, tokens) + torch.arange(tokens, device=self.start.device)

    def take(self, index: torch.Tensor, tokens: int) -> PositionRuns:
        """The positions of tokens `index` (`[..., t]` int64) of the `tokens` held."""
        return PositionRuns.of(torch.take_along_dim(self.expand(tokens), index, dim=-1))

    def token_prefix(self, stop: int) -> PositionRuns:
        """The runs of the first `stop` tokens (runs past it emptied)."""
        ends = self.length.cumsum(-1)  # [..., R]
        length = (self.length - (ends - stop).clamp_min(0)).clamp_min(0).to(POSITION_DTYPE)
        return PositionRuns(self.start, length)

    def grown(self, tokens: int) -> PositionRuns:
        """These positions followed by `tokens` more that continue each row's last run (tokens
        packed in position order): the last run lengthened, no new run, nothing read on the host."""
        length = self.length.clone()
        length[..., -1] += tokens
        return PositionRuns(self.start, length)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PositionRuns:
        """`fn` on both components (it may act on the leading dims only)."""
        return PositionRuns(fn(self.start), fn(self.length))

    @staticmethod
    def cat(parts: Sequence[PositionRuns]) -> PositionRuns:
        """The positions of `parts` one after another: their runs side by side (nothing read on
        the host; runs that continue one another stay apart until `take` or `of` merges them)."""
        return PositionRuns(torch.cat([p.start for p in parts], dim=-1), torch.cat([p.length for p in parts], dim=-1))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"start": self.start, "length": self.length}
