"""SnapKV: attention from the prompt's last queries (the observation window), pooled over neighbours.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_subtok.scorers.token_base import PRIORITY, Observation, TokenScorer, register_token_scorer


@register_token_scorer
class SnapKVScorer(TokenScorer):
    """Mean softmax attention of the last W queries to each key, averaged over the query heads
    sharing a KV head and max-pooled over `pool` neighbouring tokens (so a fact's whole span
    survives, not only its peak token). The observation window itself scores highest (2..3, newest highest)."""

    name = "snapkv"
    needs_queries = True
    pool = 15
    sinks = 4

    def score_tokens(
        self, keys: torch.Tensor, values: torch.Tensor, observation: Observation | None
    ) -> torch.Tensor:
        if observation is None:
            raise ValueError("token_scorer 'snapkv' needs the prompt's queries (observation=None)")
        batch, kv_heads, tokens, head_dim = keys.shape
        queries = observation.queries
        window = queries.shape[2]
        group = queries.shape[1] // kv_heads
        q = queries.reshape(batch, kv_heads, group * window, head_dim)  # [B, Hkv, R*W, D]
        logits = (q @ keys.transpose(-1, -2)).float() * observation.scaling  # [B, Hkv, R*W, T]
        q_pos = torch.arange(tokens - window, tokens, device=keys.device).repeat(
            group
        )  # causal inside the window
        causal = torch.arange(tokens, device=keys.device).view(1, tokens) <= q_pos.view(
            -1, 1
        )  # [R*W, T]
        allowed = causal.view(1, 1, group * window, tokens)
        if observation.key_valid is not None:
            allowed = allowed & observation.key_valid.view(batch, 1, 1, tokens)
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = logits.softmax(dim=-1).nan_to_num(0.0).mean(dim=2)  # [B, Hkv, T]
        pooled = F.max_pool1d(
            probs.view(batch * kv_heads, 1, tokens), self.pool, stride=1, padding=self.pool // 2
        )
        scores = 0.5 * (
            pooled.view(batch, kv_heads, tokens) + probs
        )  # a span's peak still ranks first
        # the observation window ranks above every other token, the newest first (when the
        # window covers most of a short prompt, recency decides what fits)
        scores[..., tokens - window :] = (
            PRIORITY + torch.arange(1, window + 1, device=keys.device) / window
        )
        scores[..., : self.sinks] = (
            PRIORITY + 1.0
        )  # attention sinks (the first tokens) rank above all
        return scores
