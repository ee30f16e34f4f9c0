"""Adaptive span: some packed tokens keep every value group, the others K of them.

With `SubTokenConfig(span="adaptive")` a layer whose plan keeps K < G groups per token stores,
for its `wide` best tokens, the other G - K groups too. What a token is worth widening is the
pair score of the groups a narrow token drops: the attention the token gets times the norm of
those groups, `p_t * ||v_t[other groups]||` (the `attention_value` group scorer's score summed
over them). The norm is stored per wide token (float16, counted in the budget) so later packs
can re-rank wide tokens by the attention they have received since; a token stored narrow
cannot become wide again (its other groups are gone), a wide one can become narrow (its other
groups are dropped).

Layout, per (batch, KV head) row: packed tokens `0..W-1` are the wide ones; their other groups
are `[B, Hkv, G-K, W, C]` with `[B, Hkv, G-K, W]` uint8 indices, ascending over slots (so the
value matmul's slot-span rule holds for them as for the base slots).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_subtok.storage.tensors import Stored, cat_stored, take_tokens

NORM_DTYPE = torch.float16  # the stored norm of a wide token's other groups
# shares of a layer's packed tokens its plan may widen (besides none)
WIDE_FRACTIONS = (0.125, 0.25, 0.5, 0.75)


def other_groups(
    values: torch.Tensor, group_idx: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups each token's packing left out.

    Args:
        values: `[B, Hkv, T, D]` dense values.
        group_idx: `[B, Hkv, K, T]` the groups packed (any order).
        num_groups: G.

    Returns:
        `(other, other_idx)`: `[B, Hkv, G-K, T, C]` channels of the other groups and their
        `[B, Hkv, G-K, T]` uint8 indices, ascending over the G-K slots.
    """
    batch, heads, keep, tokens = group_idx.shape
    width = values.shape[-1] // num_groups
    kept = torch.zeros(batch, heads, tokens, num_groups, dtype=torch.bool, device=values.device)
    kept.scatter_(3, group_idx.long().permute(0, 1, 3, 2), True)  # [B, Hkv, T, G]
    rank = kept.to(torch.int32) * num_groups + torch.arange(num_groups, device=values.device)
    order = rank.argsort(dim=-1)[..., : num_groups - keep]  # [B, Hkv, T, G-K]: others, ascending
    grouped = values.view(batch, heads, tokens, num_groups, width)  # [B, Hkv, T, G, C]
    other = grouped.gather(3, order.unsqueeze(-1).expand(-1, -1, -1, -1, width))  # [B, Hkv, T, G-K, C]
    return (
        other.permute(0, 1, 3, 2, 4).contiguous(),  # [B, Hkv, G-K, T, C]
        order.permute(0, 1, 3, 2).to(torch.uint8).contiguous(),  # [B, Hkv, G-K, T]
    )


@dataclass(frozen=True)
class WideGroups:
    """The other groups of the candidates that may be (or stay) wide.

    Attributes:
        values: `[B, Hkv, G-K, N, C]` other groups of N candidates (plain or quantized).
        group_idx: `[B, Hkv, G-K, N]` uint8.
        norms: `[B, Hkv, N]` `NORM_DTYPE` norm of each candidate's other groups.
        at: `[T]` int64, for each of the T tokens a selection chooses from, its candidate
            number in `0..N-1`, or -1 for a token stored narrow (the same for every row).
    """

    values: Stored
    group_idx: torch.Tensor
    norms: torch.Tensor
    at: torch.Tensor

    @classmethod
    def of_stored(cls, values: Stored, group_idx: torch.Tensor, norms: torch.Tensor, tokens: int) -> WideGroups:
        """What a layer holds: its first W of `tokens` packed tokens are the wide ones."""
        wide = norms.shape[-1]
        at = torch.full((tokens,), -1, dtype=torch.long, device=norms.device)
        at[:wide] = torch.arange(wide, device=norms.device)
        return cls(values, group_idx, norms, at)

    @property
    def count(self) -> int:
        """N, the candidates."""
        return self.norms.shape[-1]

    def then(self, new: WideGroups) -> WideGroups:
        """These candidates, then `new` ones for the tokens appended after these tokens."""
        return WideGroups(
            cat_stored([self.values, new.values]),
            torch.cat([self.group_idx, new.group_idx], dim=-1),
            torch.cat([self.norms, new.norms], dim=-1),
            torch.cat([self.at, torch.where(new.at >= 0, new.at + self.count, new.at)]),
        )

    def worth(self, scores: torch.Tensor) -> torch.Tensor:
        """`[B, Hkv, T]` scores of the T tokens -> what widening each is worth (`-inf` where it
        cannot be wide): its score times its other groups' norm."""
        batch, heads, tokens = scores.shape
        if self.count == 0:
            return torch.full_like(scores, float("-inf"), dtype=torch.float32)
        source = self.at.clamp_min(0).view(1, 1, tokens).expand(batch, heads, tokens)
        norms = self.norms.float().gather(2, source)  # [B, Hkv, T]
        worth = scores.clamp_min(0) * norms
        return worth.masked_fill((self.at < 0).view(1, 1, tokens) | ~scores.isfinite(), float("-inf"))

    def take(self, wide_tokens: torch.Tensor, tokens: int) -> WideGroups:
        """The other groups of `[B, Hkv, W]` chosen tokens (each of which has some), as held by
        a selection of `tokens` tokens whose first W are these."""
        source = self.at[wide_tokens]  # [B, Hkv, W]
        if (source < 0).any():
            raise ValueError("a token stored narrow cannot be widened: its other groups are gone")
        slots = self.group_idx.shape[2]
        slot_source = source.unsqueeze(2).expand(-1, -1, slots, -1)  # [B, Hkv, G-K, W]
        return WideGroups.of_stored(
            take_tokens(self.values, slot_source),
            self.group_idx.gather(3, slot_source),
            self.norms.gather(2, source),
            tokens,
        )

    def eligible(self, scores: torch.Tensor) -> int:
        """How many tokens every row could widen (those with other groups and a finite score)."""
        return int(self.worth(scores).isfinite().sum(-1).min().item()) if scores.numel() else 0
