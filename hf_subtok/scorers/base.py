"""Base class and name registry of the group scorers."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from hf_subtok.scorers.registry import Registry

_GROUP_SCORERS = Registry("group scorer", "router")


class GroupScorer(ABC):
    """Scores the value groups of tokens; a higher score means more worth keeping."""

    name: str = ""

    @abstractmethod
    def score_groups(
        self, keys: torch.Tensor, values: torch.Tensor, num_groups: int, token_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Score every value group.

        Args:
            keys: `[B, Hkv, T, D]` keys of the tokens (RoPE applied).
            values: `[B, Hkv, T, D]` values of the tokens.
            num_groups: G, the number of groups `D` is split into.
            token_weights: `[B, Hkv, T]` non-negative attention evidence per token (the
                token scorer's scores at prefill, the attention received while decoding), or
                None; query-independent scorers ignore it.

        Returns:
            `[B, Hkv, T, G]` scores.
        """


register_group_scorer = _GROUP_SCORERS.register
available_group_scorers = _GROUP_SCORERS.names
get_group_scorer = _GROUP_SCORERS.create
