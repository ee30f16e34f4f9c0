"""`PackedKV`: what a `SubTokenLayer` hands to attention instead of dense keys and values."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedKV:
    """A read-only view of one layer's cache for one attention call.

    Stored (packed) tokens come first, then the dense tail (recent window plus the tokens of
    the current forward), in position order.

    Attributes:
        keys: `[B, Hkv, Ts, D]` whole keys of the packed tokens.
        values: `[B, Hkv, K, Ts, C]` kept value groups, slot-major, `C = D / G`.
        group_idx: `[B, Hkv, K, Ts]` uint8, the group each slot holds, ascending over slots.
        num_groups: G.
        tail_keys: `[B, Hkv, Tt, D]` dense keys of the window and the current tokens.
        tail_values: `[B, Hkv, Tt, D]` dense values of the window and the current tokens.
        backend: which kernels attention uses ("auto", "torch" or "triton").
    """

    keys: torch.Tensor
    values: torch.Tensor
    group_idx: torch.Tensor
    num_groups: int
    tail_keys: torch.Tensor
    tail_values: torch.Tensor
    backend: str = "auto"

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[-2] + self.tail_keys.shape[-2]
