"""`PackedKV`: what a `SubTokenLayer` hands to attention instead of dense keys and values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hf_subtok.quant import QuantizedTensor


@dataclass(frozen=True)
class PackedKV:
    """A read-only view of one layer's cache for one attention call.

    Stored (packed) tokens come first, then the dense tail (recent window plus the tokens of
    the current forward), in position order.

    Attributes:
        keys: `[B, Hkv, Ts, D]` whole keys of the packed tokens, in the query's dtype or a
            `QuantizedTensor` of that logical shape (quantized along D).
        values: `[B, Hkv, K, Ts, C]` kept value groups, slot-major, `C = D / G`, in the
            query's dtype or a `QuantizedTensor` of that logical shape (quantized along C).
        group_idx: `[B, Hkv, K, Ts]` uint8, the group each slot holds, ascending over slots.
        num_groups: G.
        tail_keys: `[B, Hkv, Tt, D]` dense keys of the window and the current tokens.
        tail_values: `[B, Hkv, Tt, D]` dense values of the window and the current tokens.
        backend: which kernels attention uses ("auto", "torch" or "triton").
        stored_valid: `[B, Hkv, Ts]` bool when packed tokens were selected per head (their
            positions no longer line up with the attention mask, whose last Tt columns still
            cover the tail); None when every token is stored in position order.
        observer: called by attention with the `[B, Hkv, T]` attention mass each token got
            (mean over the query heads and queries), when the layer re-allocates by it.
        rotation: `(keys [D, D], values [C, C])` float32 orthonormal matrices the packed keys and
            each packed value group were multiplied by before quantizing, or None. Attention
            then runs in the rotated space (`rotated_attention_inputs`).
        wide_values: `[B, Hkv, G-K, W, C]` the other value groups of the first W packed tokens
            (adaptive span, `hf_subtok.span`), plain or quantized like `values`, or None.
        wide_group_idx: `[B, Hkv, G-K, W]` uint8 their groups, ascending over slots, or None.

    With per-head budgets the packed tokens of all KV heads share one row: `keys` is
    `[B, 1, Ts, D]` (values, indices, wide parts likewise with 1 for Hkv) while the tail keeps
    its `Hkv` heads, and `stored_valid` `[B, Hkv, Ts]` says which tokens each head owns.
    """

    keys: torch.Tensor | QuantizedTensor
    values: torch.Tensor | QuantizedTensor
    group_idx: torch.Tensor
    num_groups: int
    tail_keys: torch.Tensor
    tail_values: torch.Tensor
    backend: str = "auto"
    stored_valid: torch.Tensor | None = None
    observer: Callable[[torch.Tensor], None] | None = None
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None
    wide_values: torch.Tensor | QuantizedTensor | None = None
    wide_group_idx: torch.Tensor | None = None

    @property
    def kv_heads(self) -> int:
        """Hkv, the KV heads (of the tail; packed tokens may share one row, `shares_rows`)."""
        return self.tail_keys.shape[1]

    @property
    def shares_rows(self) -> bool:
        """Whether the packed tokens of several KV heads share one row (`[B, 1, Ts, ...]`)."""
        return self.keys.shape[1] == 1 and self.kv_heads > 1

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[-2] + self.tail_keys.shape[-2]

    @property
    def implied_groups(self) -> bool:
        """Whether every group is kept and `group_idx` is the zero-stride view of 0..G-1 the
        cache passes then (slot k holds group k; the indices are never read)."""
        return self.values.shape[2] == self.num_groups and self.group_idx.stride(-1) == 0


@dataclass(frozen=True)
class PrefillKV:
    """The dense prompt of a layer that selects tokens from the prompt's queries.

    Attention runs exactly on `keys`/`values` (`[B, Hkv, T, D]`), then calls
    `observer(observation)` with the last queries so the layer can score and pack.
    """

    keys: torch.Tensor
    values: torch.Tensor
    observer: Callable
    obs_window: int = 32
