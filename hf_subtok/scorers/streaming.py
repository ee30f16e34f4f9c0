"""StreamingLLM: attention sinks (the first tokens) plus the most recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453.
"""

from __future__ import annotations

import torch

from hf_subtok.scorers.token_base import Observation, TokenScorer, register_token_scorer


@register_token_scorer
class StreamingScorer(TokenScorer):
    """The first `sinks` tokens score highest, then tokens by recency."""

    name = "streaming"
    sinks = 4

    def score_tokens(
        self, keys: torch.Tensor, values: torch.Tensor, observation: Observation | None
    ) -> torch.Tensor:
        batch, kv_heads, tokens, _ = keys.shape
        scores = torch.arange(tokens, device=keys.device, dtype=torch.float32) / max(tokens, 1)
        scores[: self.sinks] = float("inf")
        return scores.expand(batch, kv_heads, tokens).clone()
