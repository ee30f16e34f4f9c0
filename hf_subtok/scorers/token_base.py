"""Base class and name registry of the token scorers (which tokens survive, per KV head)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from hf_subtok.scorers.registry import Registry

_TOKEN_SCORERS = Registry("token scorer", "token_scorer")


@dataclass(frozen=True)
class Observation:
    """What the attention function saw at the end of the prefill.

    Attributes:
        queries: `[B, Hq, W, D]` the last W queries of the prompt (RoPE applied).
        key_valid: `[B, T]` bool, False for keys no query may attend (left padding).
        scaling: the softmax scale of the layer.
    """

    queries: torch.Tensor
    key_valid: torch.Tensor | None
    scaling: float


class TokenScorer(ABC):
    """Scores tokens per KV head; a higher score means more worth keeping."""

    name: str = ""
    needs_queries: bool = False

    @abstractmethod
    def score_tokens(
        self, keys: torch.Tensor, values: torch.Tensor, observation: Observation | None
    ) -> torch.Tensor:
        """Score every token.

        Args:
            keys: `[B, Hkv, T, D]` keys (RoPE applied).
            values: `[B, Hkv, T, D]` values.
            observation: the prompt's last queries, when `needs_queries`.

        Returns:
            `[B, Hkv, T]` float32 scores, comparable within one (batch, head) row.
        """


register_token_scorer = _TOKEN_SCORERS.register
available_token_scorers = _TOKEN_SCORERS.names
get_token_scorer = _TOKEN_SCORERS.create
