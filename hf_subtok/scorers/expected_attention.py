"""Expected attention: the attention future queries are expected to pay each token.

Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future
Queries Distribution", arXiv 2510.00636 (kvpress's ExpectedAttentionPress). The prompt's
last queries, moved back to no rotation, give a Gaussian (mean, covariance) per query head;
averaging the rotation over the next `future` positions gives the future queries' Gaussian;
`E[exp(s q.k)] = exp(s mu.k + s^2 k'Sigma k / 2)` is then each key's expected unnormalised
attention, weighted by its value norm.
"""

from __future__ import annotations

import torch

from hf_subtok.scorers.token_base import Observation, RopeInfo, TokenScorer, register_token_scorer


@register_token_scorer
class ExpectedAttentionScorer(TokenScorer):
    """Expected softmax attention of the next `future` queries, times the value norm, as a
    mass per (batch, KV head) row; averaged over the query heads sharing a KV head."""

    name = "expected_attention"
    needs_queries = True
    future = 512
    epsilon = 0.02  # added to value norms so that tokens with tiny values still rank by attention

    def score_tokens(
        self, keys: torch.Tensor, values: torch.Tensor, observation: Observation | None
    ) -> torch.Tensor:
        if observation is None or observation.rope is None:
            raise ValueError(
                "token_scorer 'expected_attention' needs the prompt's queries and the model's rotary embedding"
            )
        batch, kv_heads, tokens, head_dim = keys.shape
        queries = observation.queries.float()  # [B, Hq, W, D]
        window = queries.shape[2]
        group = queries.shape[1] // kv_heads
        rope = observation.rope
        positions = torch.arange(tokens - window, tokens, device=keys.device, dtype=torch.float32)
        raw = _unrotate(queries, positions, rope)  # [B, Hq, W, D] without rotation
        mean = raw.mean(dim=2)  # [B, Hq, D]
        centred = raw - mean.unsqueeze(2)
        cov = centred.transpose(-1, -2) @ centred / max(window - 1, 1)  # [B, Hq, D, D]
        future = _mean_rotation(tokens, self.future, rope, head_dim, keys.device)  # [D, D]
        mean = mean @ future.T  # [B, Hq, D]
        cov = future @ cov @ future.T
        k = keys.float().repeat_interleave(group, dim=1)  # [B, Hq, T, D]
        s = observation.scaling
        logits = s * (k @ mean.unsqueeze(-1)).squeeze(-1) + 0.5 * s * s * ((k @ cov) * k).sum(
            -1
        )  # [B, Hq, T]
        if observation.key_valid is not None:
            logits = logits.masked_fill(
                ~observation.key_valid.view(batch, 1, tokens), float("-inf")
            )
        probs = logits.softmax(dim=-1).view(batch, kv_heads, group, tokens).mean(2)  # [B, Hkv, T]
        scores = probs * (torch.linalg.vector_norm(values.float(), dim=-1) + self.epsilon)
        return scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)


def _unrotate(x: torch.Tensor, positions: torch.Tensor, rope: RopeInfo) -> torch.Tensor:
    """Undo the (scaled) rotation of `positions` `[W]` on `[..., W, D]`."""
    angles = -positions.view(-1, 1) * rope.frequencies(x.device).view(1, -1)  # [W, D/2]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # [W, D]
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated_half * sin) / rope.attention_scaling


def _mean_rotation(start: int, count: int, rope: RopeInfo, head_dim: int, device) -> torch.Tensor:
    """`[D, D]` mean over positions `start..start+count-1` of the rotation matrix (scaled)."""
    positions = torch.arange(start, start + count, device=device, dtype=torch.float32)
    angles = positions.view(-1, 1) * rope.frequencies(device).view(1, -1)  # [F, D/2]
    cos, sin = angles.cos().mean(0), angles.sin().mean(0)  # [D/2]
    half = head_dim // 2
    eye = torch.eye(half, device=device)
    # x -> x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1)
    top = torch.cat([eye * cos, -eye * sin], dim=1)
    bottom = torch.cat([eye * sin, eye * cos], dim=1)
    return rope.attention_scaling * torch.cat([top, bottom], dim=0)
