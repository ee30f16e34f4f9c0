"""Group scorers: which value groups of a token are worth storing.

Each scorer lives in its own file and registers itself by name; `get_group_scorer(name)`
returns an instance. Scorers only return scores; packing is the storage's job.
"""

from hf_subtok.scorers.base import (
    GroupScorer,
    available_group_scorers,
    get_group_scorer,
    register_group_scorer,
)
from hf_subtok.scorers.value_norm import ValueNormScorer

__all__ = [
    "GroupScorer",
    "ValueNormScorer",
    "available_group_scorers",
    "get_group_scorer",
    "register_group_scorer",
]
