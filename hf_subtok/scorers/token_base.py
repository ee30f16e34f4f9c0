"""Base class and name registry of the token scorers (which tokens survive, per KV head)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

_TOKEN_SCORERS: dict[str, type[TokenScorer]] = {}


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


def register_token_scorer(cls: type[TokenScorer]) -> type[TokenScorer]:
    """Class decorator: make `cls` available under `cls.name`."""
    if not cls.name:
        raise ValueError(f"token scorer {cls.__name__} has an empty name")
    if cls.name in _TOKEN_SCORERS and _TOKEN_SCORERS[cls.name] is not cls:
        raise ValueError(f"token scorer name {cls.name!r} is already registered")
    _TOKEN_SCORERS[cls.name] = cls
    return cls


def available_token_scorers() -> tuple[str, ...]:
    return tuple(_TOKEN_SCORERS)


def get_token_scorer(name: str) -> TokenScorer:
    if name not in _TOKEN_SCORERS:
        raise ValueError(f"token_scorer must be one of {sorted(_TOKEN_SCORERS)}, got {name!r}")
    return _TOKEN_SCORERS[name]()
