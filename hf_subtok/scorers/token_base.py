"""Base class and name registry of the token scorers (which tokens survive, per KV head)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from hf_subtok.scorers.registry import Registry

_TOKEN_SCORERS = Registry("token scorer", "token_scorer")

# Scores at or above PRIORITY rank above every attention mass (masses lie in [0, 1]): such
# tokens (sinks, the observation window) are kept first and weigh nothing when plans compare
# how much attention a number of kept tokens covers.
PRIORITY = 2.0


@dataclass(frozen=True)
class Observation:
    """What the attention function saw at the end of the prefill.

    Attributes:
        queries: `[B, Hq, W, D]` the last W queries of the prompt (RoPE applied).
        key_valid: `[B, T]` bool, False for keys no query may attend (left padding).
        scaling: the softmax scale of the layer.
        rope: the model's rotary embedding (`RopeInfo`), filled in by the cache; scorers that
            move queries to other positions need it.
    """

    queries: torch.Tensor
    key_valid: torch.Tensor | None
    scaling: float
    rope: RopeInfo | None = None


@dataclass(frozen=True)
class RopeInfo:
    """A rotary embedding as transformers applies it: angle `position * inv_freq` on channel
    pairs `(i, i + D/2)`, cos and sin multiplied by `attention_scaling`."""

    inv_freq: tuple[float, ...]  # D/2 frequencies: plain numbers, so a cache holds no tensor for them
    attention_scaling: float = 1.0

    def frequencies(self, device=None) -> torch.Tensor:
        """`[D/2]` float32 `inv_freq` on `device`."""
        return torch.tensor(self.inv_freq, dtype=torch.float32, device=device)

    @classmethod
    def from_model(cls, model) -> RopeInfo | None:
        """The first `rotary_emb` module's frequencies, or None for a model without one."""
        for name, module in model.named_modules():
            if name.endswith("rotary_emb") and hasattr(module, "inv_freq"):
                return cls(
                    tuple(module.inv_freq.detach().float().tolist()),
                    float(getattr(module, "attention_scaling", 1.0)),
                )
        return None


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
            `[B, Hkv, T]` float32 scores, comparable within one (batch, head) row: attention
            masses in [0, 1] (or any ranking if negative values occur), `PRIORITY` and above
            for tokens to keep first, +inf for tokens always kept.
        """


register_token_scorer = _TOKEN_SCORERS.register
available_token_scorers = _TOKEN_SCORERS.names
get_token_scorer = _TOKEN_SCORERS.create
