"""The allocator: scores + a byte budget -> plans and keep choices, as pure functions.

`plan` picks one layer's plan (tokens, value groups, precision, wide share) for its bytes;
`split` shares the bytes among layers; `select` picks the tokens a row keeps; `planner`
collects the layers' prompt evidence for the cross-layer split.
"""

from hf_subtok.allocation.plan import LayerPlan, StorageChoice, group_energy_kept, plan_layer
from hf_subtok.allocation.select import HEAD_FLOOR, floor_heads, select_tokens, wide_first
from hf_subtok.allocation.split import LayerEvidence, split_layer_budgets

__all__ = [
    "HEAD_FLOOR",
    "LayerEvidence",
    "LayerPlan",
    "StorageChoice",
    "floor_heads",
    "group_energy_kept",
    "plan_layer",
    "select_tokens",
    "split_layer_budgets",
    "wide_first",
]
