"""Gathering whole rows along one dim: how the cache moves tokens (evicting, re-selecting,
looking up per-block key tables)."""

from __future__ import annotations

import math

import torch


def take_rows(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """`x` `[*L, T, *R]` at `index` `[*L, n]` along `dim` (= len(L)): `[*L, n, *R]`.

    Equal to `torch.take_along_dim(x, index` broadcast over `R`, `dim)`, but one `index_select`
    of whole rows over `x` flattened to `[L * T, R]` (each index offset by its place among the
    leading dims), so each row is one contiguous copy instead of an indexed read per element.
    Measured on a CPU (2 threads, 15k of 16k tokens x 3 heads): 0.08 ms against 1.5 ms for
    `take_along_dim` on 16-byte uint8 rows, 0.5 ms against 6.5 ms on 64 float32 channels.

    Args:
        x: `[*L, T, *R]`, any dtype and strides (non-contiguous `x` is copied first).
        index: `[*L, n]` integer indices in `[0, T)`, unchecked (one outside reads another
            row's token); its leading dims may broadcast to `L`, `x`'s may not.
        dim: the dim of `T`, negative counting from the end of `x`.
    """
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [-{x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim}")
    dim = dim % x.dim()
    lead, length, rest = x.shape[:dim], x.shape[dim], x.shape[dim + 1 :]
    if index.dim() != dim + 1:
        raise ValueError(f"index must have {dim + 1} dims to gather dim {dim} of {tuple(x.shape)}, got {tuple(index.shape)}")
    offsets = torch.arange(lead.numel(), device=index.device).view(*lead, 1) * length  # [*L, 1] int64
    rows = x.reshape(lead.numel() * length, math.prod(rest)).index_select(0, (index + offsets).reshape(-1))
    return rows.view(*lead, index.shape[-1], *rest)  # [*L, n, *R]


def heads_into_rows(x: torch.Tensor, token_dim: int) -> torch.Tensor:
    """`[B, H, ..., n, ...]` with its tokens at `token_dim` as one row of all heads' tokens,
    head-major: `[B, 1, ..., H * n, ...]` (heads just before the tokens, then merged with them)."""
    moved = x.movedim(1, token_dim - 1)  # [B, ..., H, n, ...]
    shape = moved.shape
    merged = moved.reshape(*shape[: token_dim - 1], shape[token_dim - 1] * shape[token_dim], *shape[token_dim + 1 :])
    return merged.unsqueeze(1)
