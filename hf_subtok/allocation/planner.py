"""`PromptPlanner`: share the cache's bytes among layers from what the prompt's attention showed.

With `layer_budgets="adaptive"`, each layer scores its prompt after the exact prefill
attention and hands it to the planner instead of packing at once. When the last of these
layers has reported, the planner splits their bytes (`allocation.split_layer_budgets`) and
every layer packs within its share. Until then each layer holds its dense prompt, as a
`DynamicCache` would during the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hf_subtok.allocation.split import split_layer_budgets

if TYPE_CHECKING:
    from hf_subtok.storage.layer import SubTokenLayer

# No layer gets less than this fraction of the bytes an equal split would give it.
LAYER_FLOOR = 0.25


@dataclass(frozen=True)
class PromptEvidence:
    """A layer's scored prompt: `[B, Hkv, T, D]` keys/values, `[B, Hkv, T]` token scores,
    `[B, Hkv, n_pack, G]` group scores of the `n_pack` oldest tokens (those to pack)."""

    keys: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    group_scores: torch.Tensor
    n_pack: int


class PromptPlanner:
    """Collects the scored prompts of `expected` layers, then packs them all under one split."""

    def __init__(self, expected: int, floor: float = LAYER_FLOOR):
        if expected < 1:
            raise ValueError(f"expected must be >= 1 layer, got {expected}")
        self.expected = expected
        self.floor = floor
        self._waiting: list[SubTokenLayer] = []
        self.last_split: list[float] | None = None  # row budgets of the last split, for reports
        self._rows: dict[int, PromptPlanner] = {0: self}

    def for_row(self, row: int) -> PromptPlanner:
        """The planner of batch row `row` (row 0: this one). Each row of a batch is planned on
        its own prompt, as if it ran alone; every layer asks the same object, so a row's
        planner collects that row's layers."""
        if row not in self._rows:
            planner = PromptPlanner(self.expected, self.floor)
            planner._rows = self._rows
            self._rows[row] = planner
        return self._rows[row]

    def submit(self, layer: SubTokenLayer) -> None:
        self._waiting.append(layer)
        if len(self._waiting) == self.expected:
            self.flush()

    def flush(self) -> None:
        """Split and pack among the layers that reported (all of them in a normal forward)."""
        layers, self._waiting = self._waiting, []
        if not layers:
            return
        own = [layer.prompt_row_budget() for layer in layers]  # the equal split
        evidence = [layer.prompt_evidence() for layer in layers]
        floors = [self.floor * max(budget, 0.0) for budget in own]
        split = split_layer_budgets(evidence, sum(own), floors)
        self.last_split = split
        for layer, row_budget in zip(layers, split, strict=True):
            layer.pack_prompt(row_budget)
