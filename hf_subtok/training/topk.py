"""Differentiable top-k over value groups: exact top-k forward, sigmoid-relaxed backward."""

from __future__ import annotations

import torch


def straight_through_topk(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Keep-mask of the `k` best groups of each token, with a straight-through gradient.

    The forward value is the exact top-k mask (what the cache stores at inference); the
    gradient is that of `sigmoid((scores - threshold) / temperature)`, where the threshold sits
    halfway between the k-th and the (k+1)-th score, so raising a dropped group's score (or
    lowering a kept one) is rewarded by the loss.

    Args:
        scores: `[..., G]` router log-scores.
        k: groups kept, 1..G.
        temperature: softness of the relaxation (> 0).

    Returns:
        `[..., G]` mask of 0/1 values (float, differentiable).
    """
    groups = scores.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= groups:
        raise ValueError(f"k must be in 1..{groups}, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    top = scores.topk(k, dim=-1)
    hard = torch.zeros_like(scores).scatter_(-1, top.indices, 1.0)
    if k == groups:
        return hard
    kth = top.values[..., -1:]
    next_best = scores.masked_fill(hard.bool(), float("-inf")).amax(-1, keepdim=True)
    threshold = (0.5 * (kth + next_best)).detach()
    soft = torch.sigmoid((scores - threshold) / temperature)
    return hard + (soft - soft.detach())  # exactly `hard` forward
