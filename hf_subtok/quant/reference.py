"""Quantization of stored keys and value groups (pure PyTorch; the CPU path and the oracle).

Asymmetric min/max quantization per group of `group_size` consecutive channels along the last
dim, per token: a cache evicts, re-selects and gathers tokens one by one, so each token keeps
its own scales and can move without touching another's.

Rounding is directed so that the stored (rounded) scale and zero still cover the group: the
zero is the group minimum rounded down, the scale `(max - zero) / (2**bits - 1)` rounded up,
in the scale dtype. Every element then lies in `[zero, zero + (2**bits - 1) * scale]` and is
reconstructed within `scale / 2` of the stored scale (plus float32 rounding of the arithmetic).

Scale dtype, measured here (RMS round-trip error on randn keys with token norms spread over
e^0..e^4, group_size 32): with float16 scales a float32 or float16 source is within 0.4% (8
bits) / 0.1% (4 bits) of float32 scales, and bfloat16 scales about 4% / 0.5% worse, so float16
is the default for those sources. For bfloat16 sources float16 scales would still be 2.5% / 0.4%
better, but a bfloat16 model's values may exceed float16's range (65504), where float16 scales
overflow to inf; the default is bfloat16 there. A float32 source beyond float16's range needs
`scale_dtype=torch.bfloat16` or `torch.float32`. Scales and zeros cost `2 * 2 / group_size`
bytes per element (0.125 at group_size 32: a 4-bit element costs 0.625 bytes).
"""

from __future__ import annotations

import torch

from hf_subtok.quant.bits import check_bits, pack_bits
from hf_subtok.quant.logscale import decode_log_scale, encode_log_scale
from hf_subtok.quant.rounding import round_down, round_up
from hf_subtok.quant.tensor import SCALE_DTYPES, QuantizedTensor


def default_scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scales and zeros are stored in for a source of `dtype`."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def check_quantize_args(x: torch.Tensor, bits: int, group_size: int) -> None:
    """Raise `ValueError` naming the field and the value unless `x` can be quantized so."""
    check_bits(bits)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(
            f"x must be a floating point tensor, got {getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    channels = x.shape[-1]
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size < 1
        or channels % group_size
    ):
        raise ValueError(
            f"group_size must be a positive int dividing the last dim ({channels}), got {group_size!r}"
        )
    if channels * bits % 8:
        raise ValueError(
            f"the last dim ({channels}) at bits={bits} leaves {channels * bits % 8} bits over a whole byte; "
            "it must be a multiple of 8 / bits"
        )


# Shares of a group's min/max half-range `quantize(clip=True)` tries around the range's middle
CLIP_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype | None = None,
    clip: bool = False,
) -> QuantizedTensor:
    """Quantize `x` `[..., N]` per group of `group_size` channels of its last dim.

    Args:
        x: `[..., N]` float32, float16 or bfloat16, e.g. keys `[B, Hkv, T, D]` or value groups
            `[B, Hkv, K, T, C]`; any strides.
        bits: 2, 4 or 8.
        group_size: channels per scale; divides N, and `N * bits` is a multiple of 8.
        scale_dtype: dtype of scale and zero; default `default_scale_dtype(x.dtype)`.
        clip: choose, per group, the range (the min/max range shrunk around its middle by one
            of `CLIP_SHRINKS`) whose round trip has the least squared error, instead of the
            min/max range: elements outside it are clamped to its ends, every other element
            still comes back within `scale / 2`, and the group's squared error is never above
            the min/max range's (a shrink of 1 is among those tried). At 2 bits this trades a
            few outliers for a finer step everywhere else.

    Returns:
        A `QuantizedTensor` of logical shape `[..., N]`; `dequantize(x.dtype)` gives `x` back
        within `scale / 2` per element (plus rounding to `x.dtype`), except clamped elements
        with `clip`.
    """
    check_quantize_args(x, bits, group_size)
    scale_dtype = default_scale_dtype(x.dtype) if scale_dtype is None else scale_dtype
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
    *lead, channels = x.shape
    levels = (1 << bits) - 1
    grouped = x.float().reshape(*lead, channels // group_size, group_size)  # [..., N/gs, gs]
    zero, scale = fit_grid(grouped, levels, scale_dtype, clip)
    codes = _codes(grouped, zero, scale, levels).to(torch.uint8).reshape(*lead, channels)  # [..., N]
    return QuantizedTensor(pack_bits(codes, bits), scale, zero, bits, group_size)


def fit_grid(
    grouped: torch.Tensor, levels: int, scale_dtype: torch.dtype, clip: bool, log_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero and scale `[..., n]` of the grid each row of float32 `grouped` `[..., n, m]` (the
    `m` elements quantized together) is coded on: its min/max range, or with `clip` the
    shrink of it (by one of `CLIP_SHRINKS`, around its middle) of least squared round-trip
    error, which is never above the min/max range's (a shrink of 1 is among those tried).
    With `log_scale` the scale is then an 8-bit logarithm (`_log_grid`)."""
    zero, scale = _fit_range(grouped, levels, scale_dtype, clip)
    return _log_grid(grouped, zero, scale, levels, scale_dtype) if log_scale else (zero, scale)


def _log_grid(
    grouped: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, levels: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid `zero`, `scale` with its scale as an 8-bit logarithm (`quant.logscale`): per
    row, the least squared error of the code just above `scale` (the grid still covers it) and
    the codes just above and below it with the grid centred on the same middle (the one below
    clamps the ends by at most half the 4.4% it is short). Measured on SmolLM2-135M-Instruct
    (`benchmarks/key_quantization_error.py`, 2-bit keys per channel, the sink alone): attention
    error 0.137 with float16 scales, 0.118 with these; rounding every scale up instead cost
    about 12% more error than float16 scales."""
    exact = scale.float()
    up = encode_log_scale(exact, round_up=True)
    codes = torch.stack([up, up, torch.where(up > 1, up - 1, up)])  # [3, ..., n]: covering, centred up, centred down
    steps = decode_log_scale(codes)
    centred = (zero.float() + levels * (exact - steps[1:]) / 2).to(scale_dtype)  # [2, ..., n]
    zeros = torch.cat([zero.unsqueeze(0), centred])  # [3, ..., n]
    best = _squared_error(grouped, zeros, steps, levels).argmin(0, keepdim=True)  # ties: the first, covering
    return zeros.gather(0, best).squeeze(0), codes.gather(0, best).squeeze(0)


def _fit_range(
    grouped: torch.Tensor, levels: int, scale_dtype: torch.dtype, clip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fit_grid`'s range: min/max, or with `clip` the shrink of least squared error."""
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)  # [..., n]
    zero, scale = _cover_range(low, high, levels, scale_dtype)
    if not clip:
        return zero, scale
    middle, half = (low + high) / 2, (high - low) / 2
    error = _squared_error(grouped, zero, scale, levels)  # [..., n]
    for shrink in CLIP_SHRINKS[1:]:
        trial_zero, trial_scale = _cover_range(middle - shrink * half, middle + shrink * half, levels, scale_dtype)
        trial_error = _squared_error(grouped, trial_zero, trial_scale, levels)
        # a range shrunk to one value (scale 0) is never taken: its error is not `scale**2 * ...`
        # (a group that is not constant but spans about one float32 ulp collapses so)
        better = (trial_error < error) & (trial_scale != 0)
        zero, scale = torch.where(better, trial_zero, zero), torch.where(better, trial_scale, scale)
        error = torch.where(better, trial_error, error)
    return zero, scale


def _cover_range(
    low: torch.Tensor, high: torch.Tensor, levels: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero and scale of the grid of `levels` steps spanning float32 `[low, high]` (any shape),
    rounded to `scale_dtype` so that they still cover it."""
    zero = round_down(low, scale_dtype)
    scale = round_up((high - zero.float()) / levels, scale_dtype)
    return zero, scale


def _divisor(scale: torch.Tensor) -> torch.Tensor:
    """`[..., N/gs, 1]` float32 scale to divide by (1 where a group is constant: scale 0)."""
    return torch.where(scale == 0, torch.ones_like(scale), scale).float().unsqueeze(-1)


def _codes(grouped: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    """Float codes `[..., N/gs, gs]` of `grouped` on the grid `zero`, `scale`."""
    return ((grouped - zero.float().unsqueeze(-1)) / _divisor(scale)).round_().clamp_(0, levels)


def _squared_error(grouped: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    """`[..., N/gs]` squared round-trip error of each group on the grid `zero`, `scale`.

    With `r = (x - zero) / scale` the error is `scale**2 * sum((clamp(round(r)) - r)**2)`: one
    fused multiply-add, a round, a clamp, a subtraction and a norm per element, about half the
    passes of dequantizing and comparing (the clip search runs it once per shrink). Groups of
    scale 0 get 0, right only when the group is constant; `quantize` never picks a shrunk range
    of scale 0.
    """
    inverse = 1 / _divisor(scale)  # [..., N/gs, 1]
    ratio = torch.addcmul(-zero.float().unsqueeze(-1) * inverse, grouped, inverse)  # [..., N/gs, gs]
    miss = ratio.round().clamp_(0, levels).sub_(ratio)
    return torch.linalg.vector_norm(miss, dim=-1).square_() * scale.float().square()
