"""Directed rounding of float32 scales and zeros into their stored dtype."""

from __future__ import annotations

import torch


def round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 `x` -> the largest `dtype` value <= x."""
    rounded = x.to(dtype)
    below = torch.nextafter(rounded, torch.full_like(rounded, float("-inf")))
    return torch.where(rounded.float() > x, below, rounded)


def round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 `x` -> the smallest `dtype` value >= x."""
    rounded = x.to(dtype)
    above = torch.nextafter(rounded, torch.full_like(rounded, float("inf")))
    return torch.where(rounded.float() < x, above, rounded)
