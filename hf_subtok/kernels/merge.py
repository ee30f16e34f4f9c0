"""Attention with its log-sum-exp, and the exact merge of attention over disjoint token sets.

Attention over tokens `A ∪ B` equals a weighted mean of attention over `A` and over `B`:
with `lse_X = log sum_{t in X} exp(s_t)`, `out = sum_X exp(lse_X - lse) * out_X` and
`lse = log sum_X exp(lse_X)`. This is how outputs over several packed blocks (each with its
own K) and the dense tail combine, and how the Triton decode kernel combines token splits.
Pure PyTorch: it is the merge on every device, and the oracle of the kernels' `lse` output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_subtok.kernels.packed_attention_reference import masked_scores, stored_value_matmul
from hf_subtok.views import PackedKV


def merge_attention_states(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge normalised attention outputs over disjoint token sets.

    Args:
        outs: N tensors `[..., D]` (e.g. `[B, Hq, Q, D]`), each softmax-normalised over its set.
        lses: N tensors `[...]` (e.g. `[B, Hq, Q]`), the log-sum-exp of each set's scaled,
            masked scores; `-inf` marks an empty set, which then contributes nothing.

    Returns:
        `(out, lse)` in float32: `[..., D]` attention over the union, `[...]` its log-sum-exp
        (`out` is 0 and `lse` is `-inf` where every set is empty).
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"outs and lses must be non-empty and of equal length, got {len(outs)} and {len(lses)}")
    for i, (out, lse) in enumerate(zip(outs, lses, strict=True)):
        if out.shape[:-1] != lses[0].shape or lse.shape != lses[0].shape:
            raise ValueError(
                f"outs[{i}] {tuple(out.shape)} and lses[{i}] {tuple(lse.shape)} must be [..., D] and [...] "
                f"with [...] = {tuple(lses[0].shape)}"
            )
    stacked_outs = torch.stack([out.float() for out in outs], dim=-2)  # [..., N, D]
    out, lse = merge_splits(stacked_outs, torch.stack([lse.float() for lse in lses], dim=-1))  # [..., 1, D], [..., 1]
    return out.squeeze(-2), lse.squeeze(-1)


def merge_splits(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_attention_states` of N sets stacked along one dim: a handful of ops whatever N
    (the Triton decode kernel's token splits are merged by it, once per layer and step).

    Args:
        outs: `[..., N, D]`, each set's softmax-normalised output.
        lses: `[..., N]`, each set's log-sum-exp (`-inf`: empty set).

    Returns:
        `(out, lse)` in float32, `[..., 1, D]` and `[..., 1]`.
    """
    lses = lses.float()
    top = lses.amax(dim=-1, keepdim=True)  # [..., 1]
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(lses - top)  # [..., N], 0 for empty sets
    total = weights.sum(dim=-1, keepdim=True)  # [..., 1]
    out = (weights / torch.where(total > 0, total, torch.ones_like(total))).unsqueeze(-2) @ outs.float()  # [..., 1, D]
    return out, top + torch.log(total)


def packed_attention_lse_reference(
    query: torch.Tensor,
    kv: PackedKV,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`packed_attention` that also returns the log-sum-exp of each query row's scores.

    Same arguments as `hf_subtok.kernels.packed_attention_reference.packed_attention`.

    Returns:
        `(out, lse)`: `[B, Hq, Q, D]` float32 normalised output and `[B, Hq, Q]` float32
        log-sum-exp of the scaled, masked scores (`-inf` for a row with no tokens).
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = kv.kv_heads
    group = q_heads // kv_heads
    stored, total = kv.keys.shape[-2], kv.num_tokens
    scores = masked_scores(query, kv, attention_mask, scaling)  # [B, Hkv, R, Q, T]
    lse = scores.logsumexp(dim=-1)  # [B, Hkv, R, Q]
    probs = scores.softmax(dim=-1).view(batch, kv_heads, group * q_len, total)  # [B, Hkv, R*Q, T]
    out = probs[..., stored:] @ kv.tail_values.float()  # [B, Hkv, R*Q, D]
    if stored:
        out = out + stored_value_matmul(probs[..., :stored], kv, query.dtype).float()
    return out.view(batch, q_heads, q_len, head_dim), lse.reshape(batch, q_heads, q_len)
