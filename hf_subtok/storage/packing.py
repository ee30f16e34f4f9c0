"""Packing: how a `SubTokenLayer` turns dense candidates into packed rows (whole keys, kept
value groups and their indices, wide tokens' other groups), re-selecting the tokens that fit
its bytes with what its policy chose (`SubTokenLayer` inherits these methods)."""

from __future__ import annotations

import dataclasses
import functools

import torch

from hf_subtok.formats import StorageFormat
from hf_subtok.kernels import pack_value_groups
from hf_subtok.quant import CodedTensor, extend_channels
from hf_subtok.quant.gather import take_rows
from hf_subtok.quant.pre_rope_keys import PreRopeKeys
from hf_subtok.storage.growth import append_tokens, concat_tokens
from hf_subtok.storage.tensors import (
    Stored,
    cat_stored,
    flatten_heads,
    key_rotation,
    key_tables,
    keys_as_stored,
    store_keys,
    store_values,
    take_tokens,
    value_rotation,
)
from hf_subtok.storage.wide import NORM_DTYPE, WIDE_FRACTIONS, WideGroups, other_groups
from hf_subtok.views import PackedKV

# a layer that never evicts preallocates its window once the context is this many windows long
WINDOW_SLACK_RATIO = 8


class Packing:
    """The `SubTokenLayer` methods that store, pack and re-select tokens."""

    def _store_keys(self, keys: torch.Tensor, positions: torch.Tensor | None = None) -> Stored:
        """`[B, Hkv, T, D]` keys as stored (quantized as the layer's storage format says); the
        first keys stored (the prompt's, whose first tokens are the attention sinks) keep
        `key_sinks` blocks of one token. Keys stored before RoPE need their `positions`
        `[B, Hkv, T]` (`key_positions`; none for an empty store)."""
        first = self.packed_keys is None or self.packed_keys.shape[-2] == 0
        rotation = self._key_rotation() if keys.shape[-2] else None  # no matrix held for an empty store
        if positions is None and self.storage.pre_rope_keys:
            positions = self.key_positions(keys, 0)  # only ever for an empty store
        stored = store_keys(
            keys, self.storage, solo=self.config.key_sinks if first else 0, rotation=rotation,
            basis=self.key_basis, positions=positions,
        )
        return flatten_heads(stored, 2) if self.shares_rows else stored  # quantized per head first

    def key_positions(self, keys: torch.Tensor, first: int) -> torch.Tensor | None:
        """`[B, Hkv, T]` positions `first, first + 1, ...` of `[B, Hkv, T, D]` keys, when the
        layer stores keys before RoPE (else None). A layer holds one sequence's real
        tokens per row (left padding dropped, `storage.rows`), so its n-th token is at position n,
        as `generate` numbers them."""
        if not self.storage.pre_rope_keys:
            return None
        positions = torch.arange(first, first + keys.shape[-2], device=keys.device)
        return positions.expand(*keys.shape[:2], -1)

    def _store_values(self, packed: torch.Tensor) -> Stored:
        """`[B, Hkv, K, T, C]` kept value groups as stored (quantized per token, or as indices
        into the codebook of the values already packed, fitted on these if there are none)."""
        if packed.shape[-2] == 0 and self.storage.coded_values:
            return packed  # an empty store holds no codebook (its bytes would be held for nothing)
        held = self.packed_values
        codebook = held.codebook if isinstance(held, CodedTensor) and held.shape[-2] else None
        rotation = self._value_rotation() if packed.shape[-2] else None
        stored = store_values(packed, self.storage, codebook, rotation=rotation)
        return flatten_heads(stored, 3) if self.shares_rows else stored

    def _reset_packed_values(self, like: torch.Tensor) -> None:
        """Empty `[B, Hkv, K, 0, C]` packed values and `[B, Hkv, K, 0]` indices for the current K
        (no indices when every group is kept: slot k holds group k, see `_group_idx_view`)."""
        batch, heads = like.shape[:2]
        self.room = {}
        empty = like.new_empty(batch, heads, self.keep_groups, 0, self.storage.width)
        self.packed_values = None  # no codebook to keep: the next values packed fit their own
        self.packed_values = self._store_values(empty)
        self.group_idx = None
        if self.keep_groups < self.config.num_groups:
            rows = 1 if self.shares_rows else heads
            self.group_idx = torch.empty(
                batch, rows, self.keep_groups, 0, dtype=torch.uint8, device=like.device
            )

    def _group_idx_view(self) -> torch.Tensor:
        """`[B, Hkv, K, Ts]` uint8 group indices: the stored ones, or with every group kept the
        implied `0..G-1` per token as a zero-stride view (no memory)."""
        if self.group_idx is not None:
            return self.group_idx
        batch, heads, tokens = self.packed_keys.shape[:3]
        groups = self.config.num_groups
        return _implied_groups(groups, self.device).expand(batch, heads, groups, tokens)

    def _view(self, tail_keys: torch.Tensor, tail_values: torch.Tensor, **extra) -> PackedKV:
        """What attention reads this step: the packed tokens, then the `[B, Hkv, Tt, D]` tail."""
        return PackedKV(
            self.packed_keys,
            self.packed_values,
            self._group_idx_view(),
            self.config.num_groups,
            tail_keys,
            tail_values,
            self.config.backend,
            rotation=self._rotation(),
            wide_values=self.wide_values,
            wide_group_idx=self.wide_idx,
            **extra,
        )

    def _rotation(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(keys [D, D], values [C, C])` the packed storage is rotated by, or None; built once
        per storage format."""
        if not self.storage.rotates:
            return None
        if self._rotation_for != self.storage:
            self._rotation_matrices = (  # no key rotation for keys stored before RoPE
                key_rotation(self.storage, self.device),
                value_rotation(self.storage, self.device),
            )
            self._rotation_for = self.storage
        return self._rotation_matrices

    def _key_rotation(self) -> torch.Tensor | None:
        rotation = self._rotation()
        return None if rotation is None else rotation[0]

    def _value_rotation(self) -> torch.Tensor | None:
        rotation = self._rotation()
        return None if rotation is None else rotation[1]

    def _pack_selected(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        scores: torch.Tensor,
        group_scores: torch.Tensor | None,
        choices: list[tuple[StorageFormat, float]] | None = None,
    ) -> None:
        """Merge `[B, Hkv, T, D]` candidates into the packed tokens, keeping the best that fit
        (with `choices`, the precisions and their fidelity, after planning the layer's groups
        and precision anew; None keeps the plan in force)."""
        if group_scores is None:
            group_scores = self._score_groups(keys, values, scores)  # [B, Hkv, T, G]
        behind_window = self.packed_positions + keys.shape[-2]
        # room for a full window: it refills up to the cap before the next pack
        row_bytes = self._packed_row_bytes(self._window_cap)
        if choices is not None:
            layer_plan = self.policy.plan(
                scores,
                group_scores,
                row_bytes,
                choices,
                self._plan_candidates(),
                WIDE_FRACTIONS if self.config.span == "adaptive" else (),
            )
            self.keep_groups, self.storage = layer_plan.keep_groups, layer_plan.storage
            self.wide_fraction = layer_plan.wide_fraction
            self.packed_keys = self._store_keys(keys.new_empty(*keys.shape[:2], 0, keys.shape[-1]))
            self._reset_packed_values(values)
            self._reset_wide(values)
        positions = self.key_positions(keys, self.packed_positions)  # [B, Hkv, T] or None
        packed, group_idx = pack_value_groups(
            values, group_scores, self.keep_groups, backend=self.config.backend
        )  # [B, Hkv, K, T, C], [B, Hkv, K, T]
        new_scores = _finite_top(scores)  # -inf: filler
        new_wide = self._wide_candidates(values, group_idx)
        limit = None  # most tokens the selection below may keep (None: every candidate)
        if self.token_scores.shape[-1] == 0:
            # nothing stored yet: choose first, then quantize the survivors together (per-channel
            # key blocks are then full blocks of kept tokens)
            if self.shares_rows:  # chosen across heads, each head's survivors quantized together
                limit, _ = self._fit(row_bytes * new_scores.shape[1], flatten_heads(new_scores, 2), (0, 0, 0), None)
                index, real = self.policy.per_head_survivors(new_scores, limit)  # [B, Hkv, Cmax]
                wide = index.shape[-1]  # every survivor stays a candidate for widening
            else:
                keep, wide = self._fit(row_bytes, new_scores, (0, 0, 0), new_wide)
                index = self._choose(new_scores, None, new_wide, keep, wide)  # [B, Hkv, keep]
                real = None
            keys, packed, group_idx, new_scores = _take_candidates(keys, packed, group_idx, new_scores, index)
            positions = None if positions is None else positions.gather(-1, index)
            if real is not None:
                new_scores = new_scores.masked_fill(~real, float("-inf"))  # repeats: fillers
            if new_wide is not None:
                new_wide = new_wide.take(index[..., :wide], index.shape[-1])
        heads = None
        if self.shares_rows:  # candidates of every head in one row, head-major
            batch, num_heads, count = new_scores.shape
            heads = torch.arange(num_heads, dtype=torch.uint8, device=self.device)
            heads = torch.cat([self.stored_heads, heads.repeat_interleave(count).expand(batch, 1, -1)], dim=-1)
            group_idx, new_scores = flatten_heads(group_idx, 3), flatten_heads(new_scores, 2)
            row_bytes *= num_heads  # the row holds every head's tokens
            if new_wide is not None:
                new_wide = WideGroups.of_stored(
                    new_wide.values, flatten_heads(new_wide.group_idx, 3),
                    flatten_heads(new_wide.norms, 2), num_heads * count,
                )
        stored = (
            cat_stored([self.packed_keys, self._store_keys(keys, positions)]),
            cat_stored([self.packed_values, self._store_values(packed)]),
            _cat_idx(self.group_idx, group_idx),
            torch.cat([self.token_scores, new_scores], dim=-1),
            heads,
        )
        wide_groups = None
        if new_wide is not None:
            new_wide = dataclasses.replace(new_wide, values=self._store_values(new_wide.values))
            held = WideGroups.of_stored(
                self.wide_values, self.wide_idx, self.wide_norms, self.token_scores.shape[-1]
            )
            wide_groups = held.then(new_wide)
        ordered = wide_groups is None  # wide tokens must come first: select at least once
        while True:  # per-channel key tables may hold more blocks than full ones would need
            count = stored[3].shape[-1]
            keep, wide = self._fit(row_bytes, stored[3], key_tables(stored[0]), wide_groups)
            if limit is not None and keep > limit:
                keep, wide = limit, min(wide, limit)
            if keep >= count and ordered:
                break
            index = self._choose(stored[3], stored[4], wide_groups, keep, wide)
            stored = self._take(*stored, index)
            if wide_groups is not None:
                wide_groups = wide_groups.take(index[..., :wide], keep)
            ordered = True
        all_keys, all_values, all_idx, all_scores, all_heads = stored
        self.packed_keys, self.packed_values = all_keys, all_values
        self.group_idx, self.token_scores, self.stored_heads = all_idx, all_scores, all_heads
        if wide_groups is not None:
            self.wide_values, self.wide_idx = wide_groups.values, wide_groups.group_idx
            self.wide_norms = wide_groups.norms
        self.packed_positions = behind_window

    def _score_groups(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """`[B, Hkv, T, G]` group scores of `[B, Hkv, T, D]` candidates, their `[B, Hkv, T]`
        token scores (attention evidence) passed on as weights for query-aware scorers."""
        weights = _finite_top(scores).clamp_min(0)
        return self.policy.score_groups(keys, values, token_weights=weights)

    def _widens(self) -> bool:
        """Whether this layer keeps the other groups of some tokens (adaptive span, K < G)."""
        return self.config.span == "adaptive" and self.keep_groups < self.config.num_groups

    def _reset_wide(self, like: torch.Tensor) -> None:
        """Empty wide storage for the current K (None when the layer does not widen)."""
        self.wide_values = self.wide_idx = self.wide_norms = None
        if not self._widens():
            return
        batch, heads = like.shape[:2]
        rows = 1 if self.shares_rows else heads
        others = self.config.num_groups - self.keep_groups
        self.wide_values = self._store_values(like.new_empty(batch, heads, others, 0, self.storage.width))
        self.wide_idx = torch.empty(batch, rows, others, 0, dtype=torch.uint8, device=like.device)
        self.wide_norms = torch.empty(batch, rows, 0, dtype=NORM_DTYPE, device=like.device)

    def _wide_candidates(self, values: torch.Tensor, group_idx: torch.Tensor) -> WideGroups | None:
        """The other groups (dense) of `[B, Hkv, T, D]` candidates packed as `group_idx`, or None."""
        if not self._widens():
            return None
        other, other_idx = other_groups(values, group_idx, self.config.num_groups)  # [B, Hkv, G-K, T, C]
        norms = torch.linalg.vector_norm(other.float(), dim=(2, 4)).to(NORM_DTYPE)  # [B, Hkv, T]
        return WideGroups.of_stored(other, other_idx, norms, values.shape[-2])

    def _fit(
        self, row_bytes: float, scores: torch.Tensor, tables: tuple[int, int, int], wide: WideGroups | None
    ) -> tuple[int, int]:
        """(tokens kept, of which wide) of the `[B, Hkv, T]`-scored candidates that fit `row_bytes`
        bytes per row, with `tables` (blocks, runs, position runs) of per-channel keys (`allocation.select.fit_tokens`)."""
        worth = None if wide is None else wide.worth(scores)
        return self.policy.fit(self.storage, self.keep_groups, row_bytes, scores, tables, worth, self.wide_fraction)

    def _choose(
        self, scores: torch.Tensor, heads: torch.Tensor | None, wide: WideGroups | None, keep: int, widened: int
    ) -> torch.Tensor:
        """`[B, Hkv or 1, keep]` indices of the tokens to keep (the `widened` wide ones first);
        with shared rows (`heads`: the head of each token) every head keeps its floor."""
        worth = None if wide is None else wide.worth(scores)
        return self.policy.choose(scores, keep, heads, self.num_heads, worth, widened)

    def _take(
        self,
        keys: Stored,
        values: Stored,
        group_idx: torch.Tensor | None,
        scores: torch.Tensor,
        heads: torch.Tensor | None,
        index: torch.Tensor,
    ):
        """The `[B, Hkv, n]` `index`ed tokens of stored `keys` `[B, Hkv, T, D]`, `values`
        `[B, Hkv, K, T, C]`, `group_idx` `[B, Hkv, K, T]` (None: implied), `scores` `[B, Hkv, T]`
        and `heads` `[B, 1, T]` (None: a row per head)."""
        slot_index = index.unsqueeze(2).expand(-1, -1, self.keep_groups, -1)  # [B, Hkv, K, keep]
        return (
            take_tokens(keys, index),
            take_tokens(values, slot_index),
            None if group_idx is None else group_idx.gather(3, slot_index),
            scores.gather(2, index),
            None if heads is None else heads.gather(2, index),
        )

    def _store_tail(self, tail_keys: torch.Tensor, tail_values: torch.Tensor) -> None:
        """Keep at most `window` newest tokens dense; pack the rest in whole chunks."""
        n_pack = self._tokens_to_pack(tail_keys.shape[-2])
        if n_pack:
            first = self.seen_tokens - tail_keys.shape[-2]  # the position of the tail's first token
            self._append_packed(tail_keys[..., :n_pack, :], tail_values[..., :n_pack, :], first)
            if self._preallocates_window():
                self.window.reserve(self.config.window)
        self.window.hold(tail_keys[..., n_pack:, :], tail_values[..., n_pack:, :])

    def _preallocates_window(self) -> bool:
        """Whether decode steps of this never-evicting layer write its window in place, and
        append packed tokens into spare room (`storage.growth`), from now on. The unused room of
        both is held too: only once the context is `WINDOW_SLACK_RATIO` windows long (the window's
        room at most 1/8 of the dense bytes, the store's 1/32 of its own), never for lossless
        storage (it holds exactly the dense bytes) nor under a budget (a promise the room could
        break)."""
        long_enough = self.seen_tokens >= WINDOW_SLACK_RATIO * self.config.window
        return long_enough and not self.lossless and self.config.budget is None

    def _append_packed(self, keys: torch.Tensor, values: torch.Tensor, first: int) -> None:
        """Pack `[B, Hkv, T, D]` tokens, the first at position `first`, after the packed ones."""
        scores = self.policy.score_groups(keys, values)  # [B, Hkv, T, G]
        packed, group_idx = pack_value_groups(
            values, scores, self.keep_groups, backend=self.config.backend
        )
        self.packed_keys = self._append_keys(keys, self.key_positions(keys, first))
        self.packed_values = self._grow("packed_values", self._store_values(packed))
        if self.group_idx is not None:
            self.group_idx = self._grow("group_idx", group_idx, dim=-1)

    def _grow(self, name: str, new: Stored, dim: int = -2) -> Stored:
        """The held `name` followed by `new` tokens: in place into spare room once the layer
        preallocates (`storage.growth`), else concatenated."""
        held = getattr(self, name)
        if not self._preallocates_window():
            return concat_tokens(held, new, dim)
        view, buffer = append_tokens(held, new, self.room.get(name), dim)
        if buffer is not None:
            self.room[name] = buffer
        return view

    def _append_keys(self, keys: torch.Tensor, positions: torch.Tensor | None) -> Stored:
        """The packed keys followed by `[B, Hkv, T, D]` new ones (at `positions`, when
        stored before RoPE), in a layer that never evicts: per-channel keys first fill the open
        last block (`extend_channels`), so decode-time chunks share 64-token tables instead of
        holding tables of their own."""
        first = self.packed_keys.shape[-2] == 0
        if first:
            stored = cat_stored([self.packed_keys, self._store_keys(keys, positions)])
        elif not self.storage.channel_keys:
            stored = self._grow("packed_keys", self._store_keys(keys))
        elif isinstance(self.packed_keys, PreRopeKeys):
            coefficients = self.key_basis.coefficients(keys, positions)  # [B, Hkv, T, D]
            grown = extend_channels(
                self.packed_keys.coefficients, coefficients, self._open_key_tokens, clip=self.storage.clip_keys
            )
            stored = self.packed_keys.extended(grown)
        else:
            stored = extend_channels(
                self.packed_keys, keys_as_stored(keys, self.storage, self._key_rotation()), self._open_key_tokens,
                clip=self.storage.clip_keys,
            )
        sinks = min(self.config.key_sinks, keys.shape[-2]) if first else 0  # blocks of one, closed
        self._open_key_tokens = (self._open_key_tokens + keys.shape[-2] - sinks) % self.storage.key_block
        return stored


@functools.lru_cache(maxsize=16)
def _implied_groups(groups: int, device: torch.device) -> torch.Tensor:
    """`[1, 1, G, 1]` uint8 `0..G-1`, built once per (G, device) outside inference mode: every
    decode step of every layer that keeps all groups reads it."""
    with torch.inference_mode(False):
        return torch.arange(groups, dtype=torch.uint8, device=device).view(1, 1, groups, 1)


def _take_candidates(
    keys: torch.Tensor, packed: torch.Tensor, group_idx: torch.Tensor, scores: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `[B, Hkv, n]` `index`ed tokens of dense candidates: keys `[B, Hkv, T, D]`, packed
    groups `[B, Hkv, K, T, C]`, their indices `[B, Hkv, K, T]` and scores `[B, Hkv, T]`."""
    slot_index = index.unsqueeze(2).expand(-1, -1, packed.shape[2], -1)  # [B, Hkv, K, n]
    return (
        take_rows(keys, index, 2),
        take_rows(packed, slot_index, 3),
        group_idx.gather(3, slot_index),
        scores.gather(2, index),
    )


def _cat_idx(stored: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor | None:
    """Stored `[B, Hkv, K, Ts]` group indices followed by `new` ones; None stays None (every
    group kept, indices implied)."""
    return None if stored is None else torch.cat([stored, new], dim=-1)


FORCED_SCORE = 4.0  # stands for a scorer's +inf (always kept) once stored; -inf stays a filler mark


def _finite_top(scores: torch.Tensor) -> torch.Tensor:
    """Scores as stored: float32, +inf replaced by `FORCED_SCORE` and NaN by -inf, so that
    `> -inf` (or `isfinite`) marks valid slots."""
    return scores.float().nan_to_num(nan=float("-inf"), posinf=FORCED_SCORE, neginf=float("-inf"))
