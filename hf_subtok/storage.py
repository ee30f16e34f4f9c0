"""`SubTokenLayer`: one layer's packed KV storage, on transformers' `CacheLayerMixin` contract."""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from hf_subtok.config import SubTokenConfig
from hf_subtok.kernels import pack_value_groups
from hf_subtok.packed import PackedKV
from hf_subtok.scorers import GroupScorer

# transformers 5.2 calls `crop(max_length)` (an absolute length, negative counts from the
# end); later releases call `crop(tokens_to_remove)` with a negative count.
_CROP_TAKES_LENGTH = "max_length" in inspect.signature(DynamicLayer.crop).parameters


class SubTokenLayer(CacheLayerMixin):
    """Packed storage of one attention layer.

    Holds, for the oldest tokens, whole keys `[B, Hkv, Ts, D]`, the kept value groups
    `[B, Hkv, K, Ts, C]` and their uint8 group indices `[B, Hkv, K, Ts]`; for the newest tokens,
    a dense window `[B, Hkv, Tw, D]` of keys and values (`Tw <= window`). When the window
    overflows, its oldest tokens are packed `pack_chunk` at a time. No dense copy of packed
    values exists anywhere.

    The first `update` (empty cache) returns the dense prompt so prefill attention is exact;
    later updates return a `PackedKV` for the attention function registered by
    `hf_subtok.attention`.
    """

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, config: SubTokenConfig, keep_groups: int, scorer: GroupScorer):
        super().__init__()
        self.config = config
        self.keep_groups = keep_groups
        self.scorer = scorer
        self._clear()

    def _clear(self) -> None:
        self.packed_keys: torch.Tensor | None = None
        self.packed_values: torch.Tensor | None = None
        self.group_idx: torch.Tensor | None = None
        self.window_keys: torch.Tensor | None = None
        self.window_values: torch.Tensor | None = None
        self.seen_tokens = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        groups = self.config.num_groups
        if head_dim % groups:
            raise ValueError(f"num_groups must divide head_dim={head_dim}, got {groups}")
        self.dtype, self.device = key_states.dtype, key_states.device
        width = head_dim // groups
        self.packed_keys = key_states.new_empty(batch, heads, 0, head_dim)
        self.packed_values = value_states.new_empty(batch, heads, self.keep_groups, 0, width)
        self.group_idx = torch.empty(batch, heads, self.keep_groups, 0, dtype=torch.uint8, device=self.device)
        self.window_keys = key_states.new_empty(batch, heads, 0, head_dim)
        self.window_values = value_states.new_empty(batch, heads, 0, head_dim)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store `[B, Hkv, T, D]` new keys/values; return what attention needs for this call."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first = self.seen_tokens == 0
        tail_keys = torch.cat([self.window_keys, key_states], dim=-2)  # [B, Hkv, Tw + T, D]
        tail_values = torch.cat([self.window_values, value_states], dim=-2)
        view = None
        if not first:
            view = PackedKV(
                self.packed_keys,
                self.packed_values,
                self.group_idx,
                self.config.num_groups,
                tail_keys,
                tail_values,
                self.config.backend,
            )
        self.seen_tokens += key_states.shape[-2]
        self._store_tail(tail_keys, tail_values)
        if first:
            return key_states, value_states
        return view, view

    def _store_tail(self, tail_keys: torch.Tensor, tail_values: torch.Tensor) -> None:
        """Keep at most `window` newest tokens dense; pack the rest in whole chunks."""
        tokens = tail_keys.shape[-2]
        overflow = tokens - self.config.window
        if overflow <= 0:
            self.window_keys, self.window_values = tail_keys, tail_values
            return
        chunk = self.config.pack_chunk
        n_pack = min(tokens, -(-overflow // chunk) * chunk)
        self._append_packed(tail_keys[..., :n_pack, :], tail_values[..., :n_pack, :])
        # clone: a slice would keep the whole tail (e.g. the full prompt) alive
        self.window_keys = tail_keys[..., n_pack:, :].clone()
        self.window_values = tail_values[..., n_pack:, :].clone()

    def _append_packed(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        scores = self.scorer.score_groups(keys, values, self.config.num_groups)  # [B, Hkv, T, G]
        packed, group_idx = pack_value_groups(values, scores, self.keep_groups)
        self.packed_keys = torch.cat([self.packed_keys, keys], dim=-2)
        self.packed_values = torch.cat([self.packed_values, packed], dim=-2)
        self.group_idx = torch.cat([self.group_idx, group_idx], dim=-1)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer holds, by name."""
        if not self.is_initialized:
            return {}
        return {
            "packed_keys": self.packed_keys,
            "packed_values": self.packed_values,
            "group_idx": self.group_idx,
            "window_keys": self.window_keys,
            "window_values": self.window_values,
        }

    def _apply(self, fn) -> None:
        """Replace every held tensor `t` by `fn(t, dim_of_batch=0)`."""
        if not self.is_initialized:
            return
        for name, tensor in self.stored_tensors().items():
            setattr(self, name, fn(tensor))

    def get_seq_length(self) -> int:
        """Tokens seen (position count), not tokens stored."""
        return self.seen_tokens

    def get_mask_sizes(self, query) -> tuple[int, int]:
        # transformers 5.2 passes `cache_position`, later releases the query length
        query_length = query.shape[0] if torch.is_tensor(query) else int(query)
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def offload(self) -> None:
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.packed_keys.device != self.device:
            self._apply(lambda t: t.to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])

    def crop(self, length_or_removed: int) -> None:
        """Drop the newest tokens (assisted decoding); see `_CROP_TAKES_LENGTH` for the argument."""
        if _CROP_TAKES_LENGTH:
            keep = length_or_removed if length_or_removed >= 0 else self.seen_tokens + length_or_removed
        else:
            if length_or_removed > 0:
                raise ValueError(f"crop takes a negative number of tokens to remove, got {length_or_removed}")
            keep = self.seen_tokens + length_or_removed
        if keep < 0:
            raise ValueError(f"cannot crop {self.seen_tokens} tokens to {keep}")
        if keep >= self.seen_tokens or not self.is_initialized:
            return
        stored = self.packed_keys.shape[-2]
        if keep >= stored:
            self.window_keys = self.window_keys[..., : keep - stored, :].clone()
            self.window_values = self.window_values[..., : keep - stored, :].clone()
        else:
            self.packed_keys = self.packed_keys[..., :keep, :].clone()
            self.packed_values = self.packed_values[..., :keep, :].clone()
            self.group_idx = self.group_idx[..., :keep].clone()
            self.window_keys = self.window_keys[..., :0, :].clone()
            self.window_values = self.window_values[..., :0, :].clone()
        self.seen_tokens = keep
