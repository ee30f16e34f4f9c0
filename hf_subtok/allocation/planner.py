"""`PromptPlanner`: share the cache's bytes among layers from what the prompt's attention showed.

With `layer_budgets="adaptive"`, each layer scores its prompt after the exact prefill
attention and, instead of packing at once, submits its evidence (`LayerEvidence`) and the
bytes per row its own budget gives it. When the last of these layers has submitted, the
planner returns the split (`split.split_layer_budgets`) and each layer packs within its share;
the cache hands the shares back (the planner never calls into a layer). Until then each
layer holds its dense prompt, as a `DynamicCache` would during the same forward.
"""

from __future__ import annotations

from collections.abc import Hashable

from hf_subtok.allocation.split import LayerEvidence, split_layer_budgets

# No layer gets less than this fraction of the bytes an equal split would give it.
LAYER_FLOOR = 0.25


class PromptPlanner:
    """Collects the evidence of `expected` layers' scored prompts, then splits their bytes."""

    def __init__(self, expected: int, floor: float = LAYER_FLOOR):
        if expected < 1:
            raise ValueError(f"expected must be >= 1 layer, got {expected}")
        self.expected = expected
        self.floor = floor
        self._waiting: list[tuple[Hashable, float, LayerEvidence]] = []
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

    def submit(self, key: Hashable, own_bytes: float, evidence: LayerEvidence) -> list[tuple[Hashable, float]]:
        """Record layer `key`'s evidence and `own_bytes` (bytes per `[B, Hkv]` row its own budget
        gives its packed prompt). Returns `(key, bytes per row)` of every waiting layer once
        `expected` layers submitted (`flush`), nothing before."""
        self._waiting.append((key, own_bytes, evidence))
        if len(self._waiting) == self.expected:
            return self.flush()
        return []

    def flush(self) -> list[tuple[Hashable, float]]:
        """Split among the layers that submitted (all of them in a normal forward): `(key, bytes
        per row)` of each, in submission order."""
        waiting, self._waiting = self._waiting, []
        if not waiting:
            return []
        own = [own_bytes for _, own_bytes, _ in waiting]  # the equal split
        floors = [self.floor * max(budget, 0.0) for budget in own]
        split = split_layer_budgets([evidence for _, _, evidence in waiting], sum(own), floors)
        self.last_split = split
        return [(key, row_bytes) for (key, _, _), row_bytes in zip(waiting, split, strict=True)]
