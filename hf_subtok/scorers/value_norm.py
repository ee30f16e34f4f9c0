"""Training-free, query-independent router: the L2 norm of each value group."""

from __future__ import annotations

import torch

from hf_subtok.scorers.base import GroupScorer, register_group_scorer


@register_group_scorer
class ValueNormScorer(GroupScorer):
    """Score of group g of token t = `||v[t, g*C:(g+1)*C]||_2` with `C = D / G`.

    A group's contribution to any attention output is its attention weight times its value
    channels, so without knowing the queries the group with the largest norm can move the
    output the most.
    """

    name = "value_norm"

    def score_groups(
        self, keys: torch.Tensor, values: torch.Tensor, num_groups: int, token_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, heads, tokens, head_dim = values.shape
        grouped = values.view(
            batch, heads, tokens, num_groups, head_dim // num_groups
        )  # [B, Hkv, T, G, C]
        return torch.linalg.vector_norm(grouped.float(), dim=-1)  # [B, Hkv, T, G]
