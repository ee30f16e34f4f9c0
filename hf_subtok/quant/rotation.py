"""Hadamard rotations: orthonormal mixes of channels that spread outliers before quantizing.

Attention is unchanged by rotating queries and keys alike (`(qR)(kR)^T = qk^T` for an
orthonormal `R`), and values can be stored rotated and their attention output rotated back
(`sum_t p_t v_t = (sum_t p_t v_t R) R^T`). A few outlier channels then no longer set the scale
of their whole group. Measured on SmolLM2-135M-Instruct (`benchmarks/key_quantization_error.py`
setting, 2 bits): attention output error with values per token in groups of 32 channels 0.150
-> 0.108 with each group rotated; keys per channel (sink alone) 0.137 -> 0.118 rotated.
"""

from __future__ import annotations

import functools

import torch


def hadamard(size: int, device=None) -> torch.Tensor:
    """The `[size, size]` float32 Sylvester-Hadamard matrix scaled to be orthonormal (and
    symmetric, so it is its own inverse). `size` must be a power of two."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size & (size - 1):
        raise ValueError(f"size must be a power of two, got {size!r}")
    matrix = torch.ones(1, 1, device=device)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / size**0.5


def rotate_groups(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """`x` `[..., N]` with each group of `C = rotation.shape[0]` channels multiplied by
    `rotation` `[C, C]` (computed in float32, returned in `x`'s dtype)."""
    width = rotation.shape[0]
    *lead, channels = x.shape
    grouped = x.float().reshape(*lead, channels // width, width)  # [..., N/C, C]
    return (grouped @ rotation).reshape(*lead, channels).to(x.dtype)


@functools.lru_cache(maxsize=16)
def shared_hadamard(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`hadamard(size, device)` built once per (size, device) and shared by every holder, so a
    cache of many layers holds (and counts) one copy. Read-only: never modify it in place."""
    return hadamard(size, device)
