"""Bit packing of small unsigned integers into uint8, along the last dim (pure PyTorch).

Byte `j` of a packed row holds codes `j*P .. j*P + P - 1` (`P = 8 / bits`), the first in the
lowest bits: at 4 bits `byte = q[2j] | q[2j+1] << 4`, at 2 bits `q[4j] | q[4j+1] << 2 | ...`.
The Triton kernels read the same layout: code `n` is `(byte[n // P] >> (n % P) * bits) & mask`.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)


def check_bits(bits) -> None:
    """Raise `ValueError` naming `bits` unless it is one of `SUPPORTED_BITS`."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)  # [P]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`[..., N]` uint8 codes in `0 .. 2**bits - 1` -> `[..., N * bits / 8]` uint8 bytes.

    Codes are not range-checked (a larger code would spill into its neighbours' bits).
    """
    check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be torch.uint8, got {codes.dtype}")
    if bits == 8:
        return codes.contiguous()
    per_byte = 8 // bits
    *lead, n = codes.shape
    if n % per_byte:
        raise ValueError(
            f"the last dim ({n}) of codes must be a multiple of {per_byte} to pack {bits}-bit codes"
        )
    grouped = codes.reshape(*lead, n // per_byte, per_byte)  # [..., N/P, P]
    return (grouped << _shifts(bits, codes.device)).sum(dim=-1, dtype=torch.uint8)  # [..., N/P]


def unpack_bits(payload: torch.Tensor, bits: int) -> torch.Tensor:
    """`[..., N * bits / 8]` uint8 bytes -> `[..., N]` uint8 codes (inverse of `pack_bits`).

    One shift-and-mask per code position in a byte (at most 4), each over the whole tensor:
    about twice as fast on a CPU as one broadcast shift against a `[P]` tensor of shifts.
    """
    check_bits(bits)
    if payload.dtype != torch.uint8:
        raise ValueError(f"payload must be torch.uint8, got {payload.dtype}")
    if bits == 8:
        return payload
    *lead, n_bytes = payload.shape
    mask = (1 << bits) - 1
    codes = [payload & mask, *[(payload >> shift) & mask for shift in range(bits, 8 - bits, bits)]]
    codes.append(payload >> (8 - bits))
    return torch.stack(codes, dim=-1).reshape(
        *lead, n_bytes * (8 // bits)
    )  # [..., N/P, P] -> [..., N]
