"""Packing: keep the best-scored value groups of each token, compactly."""

from __future__ import annotations

import torch


def pack_value_groups(
    values: torch.Tensor, scores: torch.Tensor, keep_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the `keep_groups` best groups of every token and store them slot-major.

    Args:
        values: `[B, Hkv, T, D]` dense values.
        scores: `[B, Hkv, T, G]` group scores, higher is kept.
        keep_groups: K, groups kept per token (1..G).

    Returns:
        `(packed, group_idx)`: `[B, Hkv, K, T, C]` kept channels and `[B, Hkv, K, T]` uint8 group
        indices, ascending over the K slots.
    """
    if values.dim() != 4 or scores.dim() != 4:
        raise ValueError(f"values and scores must be 4-D, got {tuple(values.shape)} and {tuple(scores.shape)}")
    batch, heads, tokens, head_dim = values.shape
    num_groups = scores.shape[-1]
    if scores.shape[:3] != values.shape[:3] or head_dim % num_groups:
        raise ValueError(
            f"scores shape {tuple(scores.shape)} does not match values shape {tuple(values.shape)}"
        )
    if not 1 <= keep_groups <= num_groups:
        raise ValueError(f"keep_groups must be in 1..{num_groups}, got {keep_groups}")
    width = head_dim // num_groups
    top = scores.topk(keep_groups, dim=-1).indices.sort(dim=-1).values  # [B, Hkv, T, K]
    grouped = values.view(batch, heads, tokens, num_groups, width)  # [B, Hkv, T, G, C]
    kept = grouped.gather(3, top.unsqueeze(-1).expand(batch, heads, tokens, keep_groups, width))  # [B, Hkv, T, K, C]
    packed = kept.permute(0, 1, 3, 2, 4).contiguous()  # [B, Hkv, K, T, C]
    group_idx = top.permute(0, 1, 3, 2).to(torch.uint8).contiguous()  # [B, Hkv, K, T]
    return packed, group_idx


def unpack_value_groups(packed: torch.Tensor, group_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Dense values with the dropped groups zero: `[B, Hkv, K, T, C]` -> `[B, Hkv, T, D]`.

    For tests and debugging only; the cache never rebuilds dense values.
    """
    batch, heads, keep, tokens, width = packed.shape
    dense = packed.new_zeros(batch, heads, tokens, num_groups, width)  # [B, Hkv, T, G, C]
    index = group_idx.long().permute(0, 1, 3, 2).unsqueeze(-1).expand(batch, heads, tokens, keep, width)
    dense.scatter_(3, index, packed.permute(0, 1, 3, 2, 4))
    return dense.view(batch, heads, tokens, num_groups * width)
