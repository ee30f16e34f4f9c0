"""`BatchRowsKV`: what a layer holding each batch row on its own hands to attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_subtok.packed import SubtokView


@dataclass(frozen=True)
class BatchRowsKV(SubtokView):
    """One attention call's view of a batch whose rows are stored separately.

    A batch of several prompts is stored row by row, each row holding only its own tokens
    (left padding dropped), budgeted, scored and packed exactly as if its prompt ran alone.
    Attention runs row by row: row `r` reads `keys[r]` / `values[r]` (dense `[1, Hkv, T_r, D]`
    tensors, a `PrefillKV` or a `PackedKV`, each as its own layer returned it) with query row
    `r` and the last `T_r` columns of that row of the attention mask (its real tokens).
    """

    keys: tuple
    values: tuple

    @staticmethod
    def tokens(kv) -> int:
        """Tokens of one row's view (keys of a dense tensor, `PrefillKV` or `PackedKV`)."""
        if torch.is_tensor(kv):
            return kv.shape[-2]
        if hasattr(kv, "num_tokens"):
            return kv.num_tokens
        return kv.keys.shape[-2]
