"""Base class and name registry of the group scorers."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

_GROUP_SCORERS: dict[str, type[GroupScorer]] = {}


class GroupScorer(ABC):
    """Scores the value groups of tokens; a higher score means more worth keeping."""

    name: str = ""

    @abstractmethod
    def score_groups(self, keys: torch.Tensor, values: torch.Tensor, num_groups: int) -> torch.Tensor:
        """Score every value group.

        Args:
            keys: `[B, Hkv, T, D]` keys of the tokens (RoPE applied).
            values: `[B, Hkv, T, D]` values of the tokens.
            num_groups: G, the number of groups `D` is split into.

        Returns:
            `[B, Hkv, T, G]` scores.
        """


def register_group_scorer(cls: type[GroupScorer]) -> type[GroupScorer]:
    """Class decorator: make `cls` available under `cls.name`."""
    if not cls.name:
        raise ValueError(f"group scorer {cls.__name__} has an empty name")
    if cls.name in _GROUP_SCORERS and _GROUP_SCORERS[cls.name] is not cls:
        raise ValueError(f"group scorer name {cls.name!r} is already registered")
    _GROUP_SCORERS[cls.name] = cls
    return cls


def available_group_scorers() -> tuple[str, ...]:
    return tuple(_GROUP_SCORERS)


def get_group_scorer(name: str) -> GroupScorer:
    if name not in _GROUP_SCORERS:
        raise ValueError(f"router must be one of {sorted(_GROUP_SCORERS)}, got {name!r}")
    return _GROUP_SCORERS[name]()
