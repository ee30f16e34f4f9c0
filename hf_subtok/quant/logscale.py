"""Positive scales stored as 8-bit logarithms (`log_scales`): one byte instead of two.

Code `c` in 1..255 stands for `2 ** ((c - LOG_BIAS) / LOG_STEPS)`, eight codes per octave
(neighbours 9% apart) over about 2**-16 to 2**16 (float16's range); code 0 stands for 0 (a
constant group). Keys' per-channel scales take the code of least squared error among those
next to the exact scale (`quant.reference.fit_grid`); codeword values' per-token scales the
nearest code (within 4.5%), small beside the error of one bit per value element.
"""

from __future__ import annotations

import torch

LOG_STEPS = 8  # codes per octave
LOG_BIAS = 128  # the code of 1.0
LOG_SCALE_DTYPE = torch.uint8


def encode_log_scale(scale: torch.Tensor, round_up: bool) -> torch.Tensor:
    """uint8 codes of non-negative `scale` (any float dtype): the nearest code, or with
    `round_up` the smallest whose value is at least `scale` (clamped to the codes 1..255; 0
    codes 0)."""
    exponent = torch.log2(scale.float()).mul_(LOG_STEPS)
    exponent = exponent.ceil_() if round_up else exponent.round_()
    codes = torch.where(scale > 0, exponent.add_(LOG_BIAS).clamp_(1, 255), 0).to(LOG_SCALE_DTYPE)
    if round_up:  # log2's rounding may leave a code one step short
        short = (decode_log_scale(codes) < scale.float()) & (codes < 255)
        codes = codes + short.to(LOG_SCALE_DTYPE)
    return codes


def decode_log_scale(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 `codes` (`encode_log_scale`)."""
    value = torch.exp2((codes.float() - LOG_BIAS) / LOG_STEPS)
    return torch.where(codes == 0, 0.0, value)


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """float32 values of a stored scale: decoded if it is held as logarithms (uint8)."""
    return decode_log_scale(scale) if scale.dtype == LOG_SCALE_DTYPE else scale.float()
