"""Allocator: spend one layer's byte budget jointly on tokens and value groups.

A kept token costs its whole key, its K kept groups, their K one-byte indices and its float32
score; keeping more groups per token leaves room for fewer tokens. For each candidate K the
allocator takes the most tokens the budget pays for and scores the plan by the token weight
it keeps times the value energy the K best groups keep; it picks the best plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_subtok.config import INDEX_BYTES

SCORE_BYTES = 4  # float32 token score kept per stored token (re-allocation while decoding)


@dataclass(frozen=True)
class LayerPlan:
    """Per (batch, head) row of one layer: packed tokens kept and value groups per token."""

    keep_tokens: int
    keep_groups: int


def packed_token_bytes(head_dim: int, num_groups: int, keep_groups: int, elem_bytes: int, scored: bool) -> int:
    """Bytes of one packed token in one KV head."""
    width = head_dim // num_groups
    return (head_dim + keep_groups * width) * elem_bytes + keep_groups * INDEX_BYTES + (SCORE_BYTES if scored else 0)


def group_energy_kept(group_scores: torch.Tensor, keep_groups: int) -> torch.Tensor:
    """`[B, Hkv, T, G]` group norms -> `[B, Hkv, T]` share of each token's value energy in its best K groups."""
    energy = group_scores.float().square()
    top = energy.topk(keep_groups, dim=-1).values.sum(-1)
    return top / energy.sum(-1).clamp_min(1e-12)


def plan_layer(
    token_scores: torch.Tensor,
    group_scores: torch.Tensor,
    row_budget_bytes: float,
    *,
    head_dim: int,
    elem_bytes: int,
    candidate_groups: list[int],
    min_tokens: int = 0,
) -> LayerPlan:
    """Choose `(keep_tokens, keep_groups)` for one layer.

    Args:
        token_scores: `[B, Hkv, T]` (higher kept; +inf always kept, -inf never).
        group_scores: `[B, Hkv, T, G]`.
        row_budget_bytes: bytes one (batch, head) row may spend on packed tokens.
        candidate_groups: the K values allowed (one value fixes K).
        min_tokens: floor of tokens per row.

    Raises:
        ValueError: when even `min_tokens` tokens at the smallest K exceed the budget.
    """
    tokens = token_scores.shape[-1]
    num_groups = group_scores.shape[-1]
    weights = _token_weights(token_scores)  # [B, Hkv, T], rows sum to 1
    ranked = weights.sort(dim=-1, descending=True).values.cumsum(-1)  # kept weight for the top-n tokens
    best: tuple[float, LayerPlan] | None = None
    for keep_groups in sorted(candidate_groups, reverse=True):  # on a tie (no evidence) keep more groups
        cost = packed_token_bytes(head_dim, num_groups, keep_groups, elem_bytes, scored=True)
        keep_tokens = min(tokens, int(row_budget_bytes // cost))
        if keep_tokens < min(min_tokens, tokens):
            continue
        if keep_tokens == 0:
            value = 0.0
        else:
            kept_weight = ranked[..., keep_tokens - 1].mean().item()
            value = kept_weight * group_energy_kept(group_scores, keep_groups).mean().item()
        if best is None or value > best[0]:
            best = (value, LayerPlan(keep_tokens, keep_groups))
    if best is None:
        cheapest = packed_token_bytes(head_dim, num_groups, min(candidate_groups), elem_bytes, scored=True)
        raise ValueError(
            f"budget leaves {row_budget_bytes:.0f} bytes per head, less than {min_tokens} token(s) "
            f"of {cheapest} bytes each"
        )
    return best[1]


def _token_weights(token_scores: torch.Tensor) -> torch.Tensor:
    """Turn scores into per-row weights summing to 1; forced (+inf) tokens weigh nothing here
    because they are kept whatever the plan, and -inf (padding) weighs nothing."""
    finite = token_scores.isfinite()
    scores = torch.where(finite, token_scores.float(), 0.0)
    if (scores[finite] >= 0).all():
        weights = scores
    else:  # scores that are not masses (e.g. negative key norms): rank tokens uniformly
        weights = finite.float()
    return weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)


def select_tokens(token_scores: torch.Tensor, keep_tokens: int) -> torch.Tensor:
    """`[B, Hkv, T]` scores -> `[B, Hkv, keep_tokens]` indices of the best tokens, ascending."""
    return token_scores.topk(keep_tokens, dim=-1).indices.sort(dim=-1).values
