"""Query-aware router: each (token, group) pair's contribution to the attention output."""

from __future__ import annotations

import torch

from hf_subtok.scorers.base import GroupScorer, register_group_scorer
from hf_subtok.scorers.value_norm import ValueNormScorer

TIE_BREAK = 1e-12  # added to every weight: below any attention mass, ranks unseen tokens' groups


@register_group_scorer
class AttentionValueScorer(GroupScorer):
    """Score of group g of token t = `w_t * ||v[t, g*C:(g+1)*C]||_2`.

    Group g of token t adds `p_t * v[t, g]` to the channels of group g of the attention output,
    so its contribution under the observed (or expected) queries is the attention weight `w_t`
    they give the token (`token_weights`: the token scorer's scores at prefill, the attention
    received while decoding) times the group's norm. Within one token this ranks groups as
    `value_norm` does; across tokens it ranks pairs, which is what an adaptive span
    (`SubTokenConfig(span="adaptive")`) and the allocator's worth compare. Without weights every
    token weighs the same (the value norm).
    """

    name = "attention_value"

    def score_groups(
        self, keys: torch.Tensor, values: torch.Tensor, num_groups: int, token_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        norms = ValueNormScorer().score_groups(keys, values, num_groups)  # [B, Hkv, T, G]
        if token_weights is None:
            return norms
        if token_weights.shape != values.shape[:3]:
            raise ValueError(
                f"token_weights must be [B, Hkv, T] = {tuple(values.shape[:3])}, got {tuple(token_weights.shape)}"
            )
        weights = token_weights.float().clamp_min(0) + TIE_BREAK  # a token no query saw: by norm
        return norms * weights.unsqueeze(-1)  # [B, Hkv, T, G]
