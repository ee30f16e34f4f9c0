"""Key norm: keep the tokens whose keys have the smallest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
arXiv 2406.11430 (kvpress's KnormPress).
"""

from __future__ import annotations

import torch

from hf_subtok.scorers.token_base import Observation, TokenScorer, register_token_scorer


@register_token_scorer
class KeyNormScorer(TokenScorer):
    """Score = -||k||_2: low-norm keys draw more attention in trained LLMs."""

    name = "key_norm"

    def score_tokens(
        self, keys: torch.Tensor, values: torch.Tensor, observation: Observation | None
    ) -> torch.Tensor:
        return -torch.linalg.vector_norm(keys.float(), dim=-1)  # [B, Hkv, T]
