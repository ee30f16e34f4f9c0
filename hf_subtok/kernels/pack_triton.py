"""Triton packing: keep the K best-scored value groups of every token, slot-major.

Layering: `_pack_kernel` (private, `@triton.jit`) -> `pack_value_groups_triton` (launcher) ->
the public dispatcher `hf_subtok.kernels.pack_value_groups`. The oracle is
`hf_subtok.kernels.pack_reference.pack_value_groups`.

One program packs a block of tokens of one (batch, KV head). The rank of group g is the number
of groups scoring higher (ties: the lower group index ranks first); the K groups of rank < K
are kept, and the slot of a kept group is the number of kept groups before it, so slots hold
ascending group indices. Every load and store is masked.

This module imports triton: import it only on the Triton path (see `hf_subtok.kernels`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_subtok.kernels._dispatch import MAX_GRID_Y, on_device


@triton.jit(do_not_specialize=["n_tokens"])
def _pack_kernel(
    V, S, OUT, IDX,
    stride_vb, stride_vh, stride_vt,
    stride_sb, stride_sh, stride_st,
    stride_ob, stride_oh, stride_ok, stride_ot,
    stride_ib, stride_ih, stride_ik,
    n_heads, n_tokens,
    GROUPS: tl.constexpr,
    KEEP: tl.constexpr,
    WIDTH: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(1)  # (batch, head) on axis 1 (at most 65535), token blocks on axis 0
    b = (pid // n_heads).to(tl.int64)  # 64-bit offsets: caches past 2**31 elements
    h = (pid % n_heads).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < n_tokens
    g_ok = g < GROUPS
    d_ok = d < HEAD_DIM

    s = tl.load(
        S + b * stride_sb + h * stride_sh + t[:, None] * stride_st + g[None, :],
        mask=t_ok[:, None] & g_ok[None, :],
        other=0.0,
    ).to(tl.float32)  # [T, G]
    # rank[t, g] = #{g' : s[t, g'] > s[t, g], or equal with g' < g}
    other = s[:, None, :]  # [T, 1, G'] (axis 2 is g')
    mine = s[:, :, None]  # [T, G, 1]
    g_other = g[None, None, :]
    g_mine = g[None, :, None]
    beats = ((other > mine) | ((other == mine) & (g_other < g_mine))) & (g_other < GROUPS)
    rank = tl.sum(beats.to(tl.int32), axis=2)  # [T, G]
    kept = (rank < KEEP) & g_ok[None, :]  # [T, G]
    kept_i = kept.to(tl.int32)
    # slot of kept group g = kept groups before it
    slot = tl.sum(kept_i[:, None, :] * (g_other < g_mine).to(tl.int32), axis=2)  # [T, G]

    idx_ptrs = IDX + b * stride_ib + h * stride_ih + slot * stride_ik + t[:, None]
    tl.store(idx_ptrs, g[None, :].to(tl.uint8) + tl.zeros_like(slot).to(tl.uint8), mask=kept & t_ok[:, None])

    # the same at channel granularity: channel d belongs to group d // C
    d_group = (d // WIDTH)[None, :, None]  # [1, D, 1]
    kept_d = tl.sum(kept_i[:, None, :] * (g_other == d_group).to(tl.int32), axis=2)  # [T, D]
    slot_d = tl.sum(kept_i[:, None, :] * (g_other < d_group).to(tl.int32), axis=2)  # [T, D]
    td_ok = t_ok[:, None] & d_ok[None, :]
    v = tl.load(V + b * stride_vb + h * stride_vh + t[:, None] * stride_vt + d[None, :], mask=td_ok, other=0.0)
    out_ptrs = OUT + b * stride_ob + h * stride_oh + slot_d * stride_ok + t[:, None] * stride_ot + (d % WIDTH)[None, :]
    tl.store(out_ptrs, v, mask=td_ok & (kept_d > 0))


def pack_block_tokens(block_d: int, block_g: int) -> int:
    """Tokens per program of the packing kernel: its `[T, D, G]` comparison tile is bounded to
    8192 elements."""
    return max(1, min(32, triton.next_power_of_2(max(1, 8192 // (block_d * block_g)))))


def pack_value_groups_triton(
    values: torch.Tensor, scores: torch.Tensor, keep_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the packing kernel; inputs are assumed checked (see `hf_subtok.kernels`).

    Args:
        values: `[B, Hkv, T, D]`, last dim contiguous.
        scores: `[B, Hkv, T, G]`, last dim contiguous.
        keep_groups: K.

    Returns:
        `(packed, group_idx)`: `[B, Hkv, K, T, C]` in the values' dtype and `[B, Hkv, K, T]` uint8.
    """
    batch, heads, tokens, head_dim = values.shape
    groups = scores.shape[-1]
    if batch * heads > MAX_GRID_Y:
        raise ValueError(f"batch * heads must be at most {MAX_GRID_Y} (a CUDA grid's second axis), got {batch * heads}")
    width = head_dim // groups
    packed = torch.empty(batch, heads, keep_groups, tokens, width, dtype=values.dtype, device=values.device)
    group_idx = torch.empty(batch, heads, keep_groups, tokens, dtype=torch.uint8, device=values.device)
    if packed.numel() == 0:
        return packed, group_idx
    block_g = triton.next_power_of_2(groups)
    block_d = triton.next_power_of_2(head_dim)
    block_t = pack_block_tokens(block_d, block_g)
    grid = (triton.cdiv(tokens, block_t), batch * heads)  # token blocks on axis 0: up to 2**31 - 1 of them
    with on_device(values.device):
        _pack_kernel[grid](
            values, scores, packed, group_idx,
            values.stride(0), values.stride(1), values.stride(2),
            scores.stride(0), scores.stride(1), scores.stride(2),
            packed.stride(0), packed.stride(1), packed.stride(2), packed.stride(3),
            group_idx.stride(0), group_idx.stride(1), group_idx.stride(2),
            heads, tokens,
            GROUPS=groups,
            KEEP=keep_groups,
            WIDTH=width,
            HEAD_DIM=head_dim,
            BLOCK_T=block_t,
            BLOCK_G=block_g,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return packed, group_idx
