"""What a `SubTokenLayer` holds, counted from its tensors: the bytes, tokens per head, its
summary and the bytes it aims at (`SubTokenLayer` inherits these methods)."""

from __future__ import annotations

import torch

from hf_subtok.storage.tensors import stored_parts


class HeldBytes:
    """The `SubTokenLayer` methods that walk what the layer holds."""

    def tokens_per_head(self) -> list[int]:
        """Packed tokens each KV head holds in the first sequence of the batch (fillers aside)."""
        if self.rows is not None:
            return self.rows[0].tokens_per_head()
        if not self.is_initialized:
            return []
        if not self.policy.evicts:
            return [self.packed_keys.shape[-2]] * self.num_heads
        return [int(n) for n in self._valid_slots()[0].sum(-1)]

    _HELD = (
        "packed_keys",
        "packed_values",
        "group_idx",
        "wide_values",
        "wide_idx",
        "wide_norms",
        "stored_heads",
        "token_scores",
    )

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer holds, by name (a quantized part as `name.payload`, ...)."""
        tensors = {}
        if self.rows is not None or self._rows_prompt is not None:
            for r, row in enumerate(self.rows or []):
                tensors.update({f"rows.{r}.{name}": t for name, t in row.stored_tensors().items()})
            return tensors
        if not self.is_initialized:
            return {}
        for name in self._HELD:
            held = getattr(self, name)
            if held is not None:
                tensors.update(stored_parts(name, held))
        tensors.update(self.window.buffers())  # whole buffers: their capacity is held too
        if self._rotation_matrices is not None:  # shared by the layers: counted once by storage
            keys_rotation, tensors["rotation.values"] = self._rotation_matrices
            if keys_rotation is not None:  # none when keys are stored before RoPE
                tensors["rotation.keys"] = keys_rotation
        if self.storage.pre_rope_keys:  # bases and frequencies of keys stored before RoPE (rows share them)
            tensors.update({f"key_basis.{name}": t for name, t in self.key_basis.tensors().items()})
        return tensors

    def summary(self) -> dict:
        """What this layer keeps (of the first batch row when stored row by row): K, bits,
        packed tokens, tokens per KV head, wide tokens, and whether the context is still at
        most `floor_tokens` (held dense, exactly)."""
        layer = self.rows[0] if self.rows else self
        held = layer.is_initialized and layer._rows_prompt is None
        return {
            "keep_groups": layer.keep_groups,
            "bits": layer.storage.bits if held else None,
            "tokens_stored": layer.packed_keys.shape[-2] if held else 0,
            "tokens_per_head": layer.tokens_per_head() if held else [],
            # packed tokens per row that keep every group (adaptive span)
            "wide_tokens": 0 if layer.wide_norms is None else layer.wide_norms.shape[-1],
            "below_floor": held and layer.seen_tokens <= layer.config.floor_tokens,
        }

    def target_bytes_held(self) -> float:
        """Bytes this layer aims to hold at most: `budget` (or the `floor_tokens` floor) of the
        dense bytes of every row and KV head; the dense bytes without a budget."""
        if self.config.budget is None:
            return float(self.dense_bytes())
        rows = self.rows if self.rows is not None else [self]
        total = 0.0
        for row in rows:
            if not row.is_initialized:
                continue
            dense = row.storage.dense_token_bytes * row.seen_tokens
            total += min(row.target_bytes(), dense) * row.window_keys.shape[0] * row.num_heads
        return total

    def dense_bytes(self) -> int:
        """What a `DynamicCache` would hold for this layer's tokens (keys and values; with a
        padded batch, the padding too)."""
        if not self.is_initialized:
            return 0
        batch = self.batch_size if self.rows is not None or self._rows_prompt is not None else self.window_keys.shape[0]
        return batch * self.num_heads * self.seen_tokens * self.storage.dense_token_bytes
