"""`SubTokenLayer`: one layer's packed KV storage, on transformers' `CacheLayerMixin` contract."""

from __future__ import annotations

import copy
import dataclasses
import inspect

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from hf_subtok.config import SubTokenConfig
from hf_subtok.formats import SCORE_BYTES, StorageFormat
from hf_subtok.kernels import pack_value_groups
from hf_subtok.quant import CodedTensor, extend_channels
from hf_subtok.quant.gather import take_rows
from hf_subtok.storage.tensors import (
    Stored,
    cat_stored,
    first_tokens,
    flatten_heads,
    key_rotation,
    key_tables,
    keys_as_stored,
    map_stored,
    quantization_fidelity,
    store_keys,
    store_values,
    stored_parts,
    take_tokens,
    value_rotation,
)
from hf_subtok.storage.wide import NORM_DTYPE, WIDE_FRACTIONS, WideGroups, other_groups
from hf_subtok.views import BatchRowsKV, PackedKV, PrefillKV


@dataclasses.dataclass(frozen=True)
class PromptEvidence:
    """A layer's scored prompt: `[B, Hkv, T, D]` keys/values, `[B, Hkv, T]` token scores,
    `[B, Hkv, n_pack, G]` group scores of the `n_pack` oldest tokens (those to pack)."""

    keys: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    group_scores: torch.Tensor
    n_pack: int


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

    With a token scorer (a budget that may cut tokens), each KV head keeps its own best
    tokens in a uniform `[B, Hkv, Ts, ...]` layout (composite tokens), with their float32
    scores `[B, Hkv, Ts]` (-inf marks a filler slot); the window's scores `[B, Hkv, Tw]`
    accumulate the attention they receive while decoding. The prompt is packed after its
    attention ran (the attention function hands over the last queries), and every later
    window chunk is packed after the step's attention, re-selecting tokens so the layer
    never holds more than `budget` of the dense bytes of the tokens seen.

    With `head_budgets="adaptive"` the heads' packed tokens share one row, `[B, 1, Ts, ...]`,
    each naming its head in `stored_heads` `[B, 1, Ts]`, so heads keep different numbers of
    tokens. With `span="adaptive"` the first W packed tokens of a row also hold their other
    G-K groups (`wide_values`, `hf_subtok.storage.wide`).
    """

    is_sliding = False
    is_compileable = False

    def __init__(
        self,
        config: SubTokenConfig,
        keep_groups: int | None,
        policy,
        planner=None,
        layers_sharing: int = 1,
    ):
        super().__init__()
        self.config = config
        self.layers_sharing = layers_sharing  # layers sharing the rotation matrices (their bytes too)
        self.fixed_keep_groups = keep_groups
        # what to keep: `hf_subtok.allocation.policy` (`KeepAll`, or `TokenPolicy` when tokens
        # are evicted), built by the cache; called by duck typing
        self.policy = policy
        # the cache's cross-layer plan (`SubTokenCache`'s `PromptPlans`): `submit(layer)` a scored
        # prompt, `flush()` what waits, `for_row(r)`; it calls `pack_prompt` (None: no plan)
        self.planner = planner
        self._clear()

    def _clear(self) -> None:
        # a batch of several prompts: each row stored by a layer of its own (`_split_rows`)
        self.rows: list[SubTokenLayer] | None = None
        self._rows_prompt: tuple[torch.Tensor, torch.Tensor] | None = None
        self.packed_keys: Stored | None = None  # a `QuantizedTensor` with `config.bits`
        self.packed_values: Stored | None = None
        self.group_idx: torch.Tensor | None = None
        self.window_keys: torch.Tensor | None = None
        self.window_values: torch.Tensor | None = None
        self.token_scores: torch.Tensor | None = None
        # adaptive span: the other groups of the first W packed tokens (`hf_subtok.storage.wide`)
        self.wide_values: Stored | None = None  # [B, Hkv, G-K, W, C]
        self.wide_idx: torch.Tensor | None = None  # [B, Hkv, G-K, W] uint8
        self.wide_norms: torch.Tensor | None = None  # [B, Hkv, W] float16
        self.wide_fraction = 0.0  # share of the packed tokens the plan widens
        # per-head budgets: packed tokens of all heads share one row, each naming its head
        self.stored_heads: torch.Tensor | None = None  # [B, 1, Ts] uint8
        self.window_scores: torch.Tensor | None = None
        self.keep_groups = self.fixed_keep_groups
        self.budget = self.config.budget  # this layer's share of the dense bytes (plans move it)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prompt: PromptEvidence | None = None  # scored prompt waiting for the cross-layer plan
        self.packed_positions = 0  # seen tokens behind the window (packed or evicted)
        self._window_cap: int | None = None  # dense tokens allowed until the next pack
        self._open_key_tokens = 0  # tokens in the last per-channel key block, if it has room (never-evicting layers)
        self.seen_tokens = 0
        self._rotation_for: StorageFormat | None = None  # the format `_rotation_matrices` serve
        self._rotation_matrices: tuple[torch.Tensor, torch.Tensor] | None = None
        self.is_initialized = False

    @property
    def shares_rows(self) -> bool:
        """Whether the KV heads' packed tokens share one row per sequence (`head_budgets=
        'adaptive'`): packed tensors are then `[B, 1, Ts, ...]` and heads keep different counts."""
        return self.config.head_budgets == "adaptive" and self.policy.evicts

    def _start_rows(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """The prompt of a batch: exact attention over the `[B, Hkv, T, D]` padded prompt, then
        `_split_rows` stores each row's own tokens in a layer of its own."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim, self.num_heads = key_states.shape[-1], key_states.shape[1]
        self.storage = self.config.storage_format(self.head_dim, key_states.element_size())
        self.batch_size = key_states.shape[0]
        self.seen_tokens = key_states.shape[-2]
        self._rows_prompt = (key_states, value_states)
        self.is_initialized = True
        view = PrefillKV(key_states, value_states, self._split_rows, self.config.obs_window)
        return view, view

    def _split_rows(self, observation) -> None:
        """Give each batch row its real tokens (the `key_valid` ones: left padding dropped) and
        the queries over them, so it is budgeted, scored and packed as if it ran alone."""
        keys, values = self._rows_prompt
        self._rows_prompt = None
        rows = []
        for r in range(keys.shape[0]):
            row_keys, row_values = keys[r : r + 1], values[r : r + 1]  # [1, Hkv, T, D]
            if observation is not None and observation.key_valid is not None:
                real = observation.key_valid[r]  # [T]
                row_keys, row_values = row_keys[:, :, real], row_values[:, :, real]
            row = SubTokenLayer(
                self.config, self.fixed_keep_groups, self.policy,
                None if self.planner is None else self.planner.for_row(r), self.layers_sharing,
            )
            view, _ = row.update(row_keys, row_values)
            if isinstance(view, PrefillKV):
                row_observation = None
                if observation is not None:
                    last = min(observation.queries.shape[2], row_keys.shape[-2])
                    queries = observation.queries[r : r + 1, :, observation.queries.shape[2] - last :]
                    row_observation = dataclasses.replace(observation, queries=queries, key_valid=None)
                view.observer(row_observation)
            rows.append(row)
        self.rows = rows

    def _update_rows(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Each row's layer stores its `[1, Hkv, T, D]` row; attention reads the rows' views."""
        if self._rows_prompt is not None:  # the prompt's attention never reported back
            self._split_rows(None)
        self.seen_tokens += key_states.shape[-2]
        views = [row.update(key_states[r : r + 1], value_states[r : r + 1]) for r, row in enumerate(self.rows)]
        view = BatchRowsKV(tuple(k for k, _ in views), tuple(v for _, v in views))
        return view, view

    def leaf_layers(self) -> list[SubTokenLayer]:
        """The layers holding tensors: this one, or one per batch row."""
        if self.rows is None:
            return [self] if self.is_initialized and self._rows_prompt is None else []
        return self.rows

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = head_dim
        self.storage: StorageFormat = self.config.storage_format(
            head_dim, key_states.element_size()
        )
        if self.keep_groups is None:
            self.keep_groups = self.config.num_groups  # until the prefill plan picks K
        self.packed_keys = self._store_keys(key_states.new_empty(batch, heads, 0, head_dim))
        self._reset_packed_values(value_states)
        self.window_keys = key_states.new_empty(batch, heads, 0, head_dim)
        self.window_values = value_states.new_empty(batch, heads, 0, head_dim)
        self.num_heads = heads
        if self.policy.evicts:
            rows = 1 if self.shares_rows else heads
            self.token_scores = torch.empty(
                batch, rows, 0, dtype=torch.float32, device=self.device
            )
            if self.shares_rows:
                self.stored_heads = torch.empty(batch, 1, 0, dtype=torch.uint8, device=self.device)
            self.window_scores = torch.empty(
                batch, heads, 0, dtype=torch.float32, device=self.device
            )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store `[B, Hkv, T, D]` new keys/values; return what attention needs for this call:
        dense tensors while the context is at most `floor_tokens` (or for the prompt of a layer
        that never evicts), a `PrefillKV` when the prompt is scored from its queries, a
        `PackedKV` once tokens are packed, a `BatchRowsKV` for a batch stored row by row."""
        if self.rows is not None:
            return self._update_rows(key_states, value_states)
        if not self.is_initialized and key_states.shape[0] > 1:
            return self._start_rows(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._flush()
        if self.policy.evicts:
            return self._update_evicting(key_states, value_states)
        first = self.seen_tokens == 0
        tail_keys = torch.cat([self.window_keys, key_states], dim=-2)  # [B, Hkv, Tw + T, D]
        tail_values = torch.cat([self.window_values, value_states], dim=-2)
        self.seen_tokens += key_states.shape[-2]
        if self.seen_tokens <= self.config.floor_tokens and self.packed_keys.shape[-2] == 0:
            self.window_keys, self.window_values = tail_keys, tail_values  # short: kept exactly
            return tail_keys, tail_values
        view = None if first else self._view(tail_keys, tail_values)
        self._store_tail(tail_keys, tail_values)
        if first:
            return key_states, value_states
        return view, view

    def _update_evicting(self, key_states: torch.Tensor, value_states: torch.Tensor):
        new = key_states.shape[-2]
        self.seen_tokens += new
        if self._window_cap is None:  # nothing packed yet: exact attention, then score
            tail_keys = key_states
            if self.window_keys.shape[-2]:
                tail_keys = torch.cat([self.window_keys, key_states], dim=-2)  # [B, Hkv, Tw + T, D]
                value_states = torch.cat([self.window_values, value_states], dim=-2)
            self._pending = (tail_keys, value_states)
            # a context up to `floor_tokens` stays dense; past it the whole context is scored
            # and packed as a prompt of that length would be
            short = self.seen_tokens <= self.config.floor_tokens
            observer = self._hold_dense if short else self._finish_prefill
            view = PrefillKV(tail_keys, value_states, observer, self.config.obs_window)
            return view, view
        tail_keys = torch.cat([self.window_keys, key_states], dim=-2)  # [B, Hkv, Tw + T, D]
        tail_values = torch.cat([self.window_values, value_states], dim=-2)
        self._pending = (tail_keys, tail_values)
        view = self._view(
            tail_keys,
            tail_values,
            stored_valid=self._valid_slots(),
            observer=self._finish_step,
        )
        return view, view

    def _valid_slots(self) -> torch.Tensor:
        """`[B, Hkv, Ts]` bool: which packed slots hold a token (not a filler) of each head.
        Derived when asked, not held: a held mask would be bytes outside the budget. With
        shared rows, a head's slots are the tokens naming it."""
        valid = self.token_scores.isfinite()  # [B, 1 or Hkv, Ts]
        if self.shares_rows:
            heads = torch.arange(self.num_heads, device=self.device).view(1, -1, 1)
            valid = valid & (self.stored_heads.long() == heads)  # [B, Hkv, Ts]
        return valid

    @property
    def keys(self) -> torch.Tensor | None:
        """`[B, Hkv, T, D]` dense keys, as a `DynamicLayer` has them, while this layer holds
        every token dense (nothing packed yet: a context up to `floor_tokens`); None before the
        first token. Once tokens are packed, reading it raises `AttributeError` saying so: the
        packed storage is read by the 'hf_subtok' attention function (`stored_tensors()` lists it)."""
        return self._dense_part("keys", "window_keys")

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:  # transformers' `CacheLayerMixin.__init__` sets None
            raise AttributeError("SubTokenLayer.keys is read-only: store tokens with update()")

    @property
    def values(self) -> torch.Tensor | None:
        """`[B, Hkv, T, D]` dense values while nothing is packed (see `keys`)."""
        return self._dense_part("values", "window_values")

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("SubTokenLayer.values is read-only: store tokens with update()")

    def _dense_part(self, name: str, window: str) -> torch.Tensor | None:
        if not self.is_initialized:
            return None
        packed = self.rows is not None or self._rows_prompt is not None or self.packed_keys.shape[-2] > 0
        if packed or self._pending is not None:
            raise AttributeError(
                f"SubTokenLayer.{name}: this layer holds packed sub-token storage (whole keys, kept value groups"
                f"{', a row per batch sequence' if self.rows is not None else ''}), not a dense tensor of every token; "
                "only the 'hf_subtok' attention function reads it (hf_subtok.install_attention). "
                "stored_tensors() lists what it holds; use a DynamicCache to read dense keys and values."
            )
        return getattr(self, window)

    def tokens_per_head(self) -> list[int]:
        """Packed tokens each KV head holds in the first sequence of the batch (fillers aside)."""
        if self.rows is not None:
            return self.rows[0].tokens_per_head()
        if not self.is_initialized:
            return []
        if not self.policy.evicts:
            return [self.packed_keys.shape[-2]] * self.num_heads
        return [int(n) for n in self._valid_slots()[0].sum(-1)]

    def _store_keys(self, keys: torch.Tensor) -> Stored:
        """`[B, Hkv, T, D]` keys as stored (quantized as the layer's storage format says); the
        first keys stored (the prompt's, whose first tokens are the attention sinks) keep
        `key_sinks` blocks of one token."""
        first = self.packed_keys is None or self.packed_keys.shape[-2] == 0
        rotation = self._key_rotation() if keys.shape[-2] else None  # no matrix held for an empty store
        stored = store_keys(keys, self.storage, solo=self.config.key_sinks if first else 0, rotation=rotation)
        return flatten_heads(stored, 2) if self.shares_rows else stored  # quantized per head first

    def _store_values(self, packed: torch.Tensor) -> Stored:
        """`[B, Hkv, K, T, C]` kept value groups as stored (quantized per token, or as indices
        into the codebook of the values already packed, fitted on these if there are none)."""
        held = self.packed_values
        codebook = held.codebook if isinstance(held, CodedTensor) and held.shape[-2] else None
        rotation = self._value_rotation() if packed.shape[-2] else None
        stored = store_values(packed, self.storage, codebook, rotation=rotation)
        return flatten_heads(stored, 3) if self.shares_rows else stored

    def _reset_packed_values(self, like: torch.Tensor) -> None:
        """Empty `[B, Hkv, K, 0, C]` packed values and `[B, Hkv, K, 0]` indices for the current K
        (no indices when every group is kept: slot k holds group k, see `_group_idx_view`)."""
        batch, heads = like.shape[:2]
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
        implied = torch.arange(groups, dtype=torch.uint8, device=self.device).view(1, 1, groups, 1)
        return implied.expand(batch, heads, groups, tokens)

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
            self._rotation_matrices = (
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

    def _flush(self) -> None:
        """Store a pending tail whose attention never reported back (another attention path)."""
        if self._prompt is not None:
            self.planner.flush()
        if self._pending is None:
            return
        if self._window_cap is None and self.seen_tokens <= self.config.floor_tokens:
            self._hold_dense(None)
        elif self._window_cap is None:
            self._finish_prefill(None)
            if self._prompt is not None:
                self.planner.flush()
        else:
            self._finish_step(None)

    def _hold_dense(self, observation) -> None:
        """Keep a context of at most `floor_tokens` dense, holding nothing else (its ratio is
        exactly 1): when it grows past the floor, the queries of that call score its tokens."""
        self.window_keys, self.window_values = self._pending
        self._pending = None

    def _finish_prefill(self, observation) -> None:
        """Score the prompt's tokens and groups, plan this layer's budget, pack."""
        keys, values = self._pending
        self._pending = None
        scores = self.policy.score_tokens(keys, values, observation)  # [B, Hkv, T]
        n_pack = self._tokens_to_pack(keys.shape[-2])
        group_scores = self._score_groups(
            keys[..., :n_pack, :], values[..., :n_pack, :], scores[..., :n_pack]
        )
        self._prompt = PromptEvidence(keys, values, scores, group_scores, n_pack)
        self._check_budget_affords_a_token()
        if self.planner is None or self._floor_binds():
            self.pack_prompt(None)
        else:
            self.planner.submit(self)

    def prompt_evidence(self):
        """What the scored prompt tells the cross-layer split (the policy's `LayerEvidence`)."""
        prompt = self._prompt
        return self.policy.evidence(
            prompt.scores[..., : prompt.n_pack],
            prompt.group_scores,
            self._storage_choices(
                prompt.keys[..., : prompt.n_pack, :], prompt.values[..., : prompt.n_pack, :]
            ),
            self._plan_candidates(),
        )

    def prompt_row_budget(self) -> float:
        """Bytes per (batch, head) row this layer's own budget gives its packed prompt tokens."""
        return self._row_budget(self._window_cap)

    def pack_prompt(self, row_budget: float | None) -> None:
        """Pack the scored prompt within `row_budget` bytes per row (None: this layer's budget);
        the layer's budget then becomes the share it was given."""
        prompt, self._prompt = self._prompt, None
        if row_budget is not None:
            dense = self.storage.dense_token_bytes
            self.budget = (row_budget + self._window_cap * (dense + SCORE_BYTES)) / (
                dense * self.seen_tokens
            )
        n_pack = prompt.n_pack
        keys, values, scores = prompt.keys, prompt.values, prompt.scores
        self._pack_selected(
            keys[..., :n_pack, :],
            values[..., :n_pack, :],
            scores[..., :n_pack],
            prompt.group_scores,
            plan=True,
        )
        self.window_keys = keys[..., n_pack:, :].clone()
        self.window_values = values[..., n_pack:, :].clone()
        self.window_scores = _finite_top(scores[..., n_pack:])

    def _finish_step(self, mass: torch.Tensor | None) -> None:
        """Accumulate this step's attention mass, then keep the budget while packing overflow."""
        tail_keys, tail_values = self._pending
        self._pending = None
        stored = self.packed_keys.shape[-2]
        batch, heads, window = self.window_scores.shape
        new_scores = self.window_scores.new_zeros(batch, heads, tail_keys.shape[-2] - window)
        tail_scores = torch.cat([self.window_scores, new_scores], dim=-1)  # [B, Hkv, Tw + T]
        if mass is not None:
            stored_mass = mass[..., :stored]  # [B, Hkv, Ts]
            if self.shares_rows:  # each token's own head
                stored_mass = stored_mass.gather(1, self.stored_heads.long())  # [B, 1, Ts]
            # out of place: rows of a batch copied for beams share their tensors, and a cache
            # filled under inference_mode continues under no_grad
            self.token_scores = self.token_scores + stored_mass
            tail_scores = tail_scores + mass[..., stored:]
        n_pack = self._tokens_to_pack(tail_keys.shape[-2])
        if n_pack:
            head_scores = tail_scores[..., :n_pack]
            self._pack_selected(
                tail_keys[..., :n_pack, :],
                tail_values[..., :n_pack, :],
                head_scores,
                None,
                plan=False,
            )
            tail_keys, tail_values = (
                tail_keys[..., n_pack:, :].clone(),
                tail_values[..., n_pack:, :].clone(),
            )
        self.window_keys, self.window_values = tail_keys, tail_values
        self.window_scores = tail_scores[..., n_pack:].clone()

    def _tokens_to_pack(self, tokens: int) -> int:
        """How many of the `tokens` oldest dense tokens to pack now (whole chunks)."""
        if not self.policy.evicts:
            overflow = tokens - self.config.window
        elif self._window_cap is None or tokens > self._window_cap:  # a pack is due: new cap
            first = self._window_cap is None
            self._window_cap = self._window_limit()
            # once packing, always pack: the packed budget must be re-planned for the new cap
            overflow = tokens - self._window_cap if first else max(tokens - self._window_cap, 1)
        else:
            overflow = 0
        if overflow <= 0:
            return 0
        chunk = self.config.chunk_tokens
        if self.policy.evicts:  # a cap shrunk by a small budget packs smaller chunks
            chunk = max(1, min(chunk, self._window_cap // 2))
        return min(tokens, -(-overflow // chunk) * chunk)

    def _window_limit(self) -> int:
        """Dense tokens allowed: `window`, shrunk so it never takes more than half the budget."""
        dense = self.storage.dense_token_bytes
        affordable = int(0.5 * self.target_bytes() // (dense + SCORE_BYTES))
        return min(self.config.window, affordable)

    def target_bytes(self) -> float:
        """Bytes one (batch, head) row of this layer may hold: `budget` of the dense bytes of
        the tokens seen, and never less than `floor_tokens` dense tokens' bytes."""
        dense = self.storage.dense_token_bytes
        return max(self.budget * dense * self.seen_tokens, self.config.floor_tokens * dense)

    def _floor_binds(self) -> bool:
        """Whether `floor_tokens`, not `budget`, sets this layer's bytes now."""
        return self.budget * self.seen_tokens < self.config.floor_tokens

    def _check_budget_affords_a_token(self) -> None:
        """Refuse a budget that leaves less than one packed token per KV head."""
        dense = self.storage.dense_token_bytes
        formats = self.config.storage_formats(self.head_dim, self.storage.elem_bytes)
        cheapest = min(f.token_bytes(min(self._plan_candidates()), scored=True) for f in formats)
        if self.config.budget * dense * self.seen_tokens < cheapest:
            raise ValueError(
                f"budget={self.config.budget} leaves {self.config.budget * dense * self.seen_tokens:.1f} bytes per "
                f"KV head at {self.seen_tokens} tokens, less than one packed token ({cheapest} bytes): raise budget"
            )

    def _row_budget(self, window_tokens: int) -> float:
        """Bytes one (batch, head) row may spend on packed tokens with `window_tokens` dense."""
        dense = self.storage.dense_token_bytes
        return self.target_bytes() - window_tokens * (dense + SCORE_BYTES) - self._shared_bytes_per_row()

    def _shared_bytes_per_row(self) -> float:
        """This layer's share, per (batch, head) row, of the rotation matrices all layers share
        (`[D, D]` and `[C, C]` float32), when any format it may pick is rotated."""
        formats = self.config.storage_formats(self.head_dim, self.storage.elem_bytes)
        if not any(f.rotates for f in formats):
            return 0.0
        matrices = 4 * (self.head_dim**2 + self.storage.width**2)
        return matrices / self.layers_sharing / (self.window_keys.shape[0] * self.num_heads)

    def _pack_selected(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        scores: torch.Tensor,
        group_scores: torch.Tensor | None,
        plan: bool,
    ) -> None:
        """Merge `[B, Hkv, T, D]` candidates into the packed tokens, keeping the best that fit."""
        if group_scores is None:
            group_scores = self._score_groups(keys, values, scores)  # [B, Hkv, T, G]
        behind_window = self.packed_positions + keys.shape[-2]
        # room for a full window: it refills up to the cap before the next pack
        budget = self._row_budget(self._window_cap)
        if plan:
            layer_plan = self.policy.plan(
                scores,
                group_scores,
                budget,
                self._storage_choices(keys, values),
                self._plan_candidates(),
                WIDE_FRACTIONS if self.config.span == "adaptive" else (),
            )
            self.keep_groups, self.storage = layer_plan.keep_groups, layer_plan.storage
            self.wide_fraction = layer_plan.wide_fraction
            self.packed_keys = self._store_keys(keys.new_empty(*keys.shape[:2], 0, keys.shape[-1]))
            self._reset_packed_values(values)
            self._reset_wide(values)
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
                limit, _ = self._fit(budget * new_scores.shape[1], flatten_heads(new_scores, 2), (0, 0), None)
                index, real = self.policy.per_head_survivors(new_scores, limit)  # [B, Hkv, Cmax]
                wide = index.shape[-1]  # every survivor stays a candidate for widening
            else:
                keep, wide = self._fit(budget, new_scores, (0, 0), new_wide)
                index = self._choose(new_scores, None, new_wide, keep, wide)  # [B, Hkv, keep]
                real = None
            keys, packed, group_idx, new_scores = _take_candidates(keys, packed, group_idx, new_scores, index)
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
            budget *= num_heads  # the row holds every head's tokens
            if new_wide is not None:
                new_wide = WideGroups.of_stored(
                    new_wide.values, flatten_heads(new_wide.group_idx, 3),
                    flatten_heads(new_wide.norms, 2), num_heads * count,
                )
        stored = (
            cat_stored([self.packed_keys, self._store_keys(keys)], dim=-2),
            cat_stored([self.packed_values, self._store_values(packed)], dim=-2),
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
            keep, wide = self._fit(budget, stored[3], key_tables(stored[0]), wide_groups)
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
        self, row_bytes: float, scores: torch.Tensor, tables: tuple[int, int], wide: WideGroups | None
    ) -> tuple[int, int]:
        """(tokens kept, of which wide) of the `[B, Hkv, T]`-scored candidates that fit `row_bytes`
        bytes per row, with `tables` (blocks, runs) of per-channel keys (`allocation.select.fit_tokens`)."""
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
            take_tokens(keys, index, dim=2),
            take_tokens(values, slot_index, dim=3),
            None if group_idx is None else group_idx.gather(3, slot_index),
            scores.gather(2, index),
            None if heads is None else heads.gather(2, index),
        )

    def _storage_choices(self, keys: torch.Tensor, values: torch.Tensor) -> list[tuple[StorageFormat, float]]:
        """The precisions the plan may pick, each with its fidelity on these keys and values."""
        formats = self.config.storage_formats(self.head_dim, self.storage.elem_bytes)
        if len(formats) == 1:
            return [(formats[0], 1.0)]
        return [(f, quantization_fidelity(keys, values, f)) for f in formats]

    def _plan_candidates(self) -> list[int]:
        if self.fixed_keep_groups:
            return [self.fixed_keep_groups]
        if self.config.axes == "tokens":
            return [self.config.num_groups]
        return list(range(1, self.config.num_groups + 1))

    def _store_tail(self, tail_keys: torch.Tensor, tail_values: torch.Tensor) -> None:
        """Keep at most `window` newest tokens dense; pack the rest in whole chunks."""
        n_pack = self._tokens_to_pack(tail_keys.shape[-2])
        if n_pack == 0:
            self.window_keys, self.window_values = tail_keys, tail_values
            return
        self._append_packed(tail_keys[..., :n_pack, :], tail_values[..., :n_pack, :])
        # clone: a slice would keep the whole tail (e.g. the full prompt) alive
        self.window_keys = tail_keys[..., n_pack:, :].clone()
        self.window_values = tail_values[..., n_pack:, :].clone()

    def _append_packed(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        scores = self.policy.score_groups(keys, values)  # [B, Hkv, T, G]
        packed, group_idx = pack_value_groups(
            values, scores, self.keep_groups, backend=self.config.backend
        )
        self.packed_keys = self._append_keys(keys)
        self.packed_values = cat_stored([self.packed_values, self._store_values(packed)], dim=-2)
        self.group_idx = _cat_idx(self.group_idx, group_idx)

    def _append_keys(self, keys: torch.Tensor) -> Stored:
        """The packed keys followed by `[B, Hkv, T, D]` new ones, in a layer that never evicts:
        per-channel keys first fill the open last block (`extend_channels`), so decode-time
        chunks share 64-token tables instead of holding tables of their own."""
        first = self.packed_keys.shape[-2] == 0
        if first or not self.storage.channel_keys:
            stored = cat_stored([self.packed_keys, self._store_keys(keys)], dim=-2)
        else:
            stored = extend_channels(
                self.packed_keys, keys_as_stored(keys, self.storage, self._key_rotation()), self._open_key_tokens,
                clip=self.storage.clip_keys,
            )
        sinks = min(self.config.key_sinks, keys.shape[-2]) if first else 0  # blocks of one, closed
        self._open_key_tokens = (self._open_key_tokens + keys.shape[-2] - sinks) % self.storage.key_block
        return stored

    _HELD = (
        "packed_keys",
        "packed_values",
        "group_idx",
        "wide_values",
        "wide_idx",
        "wide_norms",
        "stored_heads",
        "window_keys",
        "window_values",
        "token_scores",
        "window_scores",
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
        if self._rotation_matrices is not None:  # shared by the layers: counted once by storage
            tensors["rotation.keys"], tensors["rotation.values"] = self._rotation_matrices
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
            dense = row.storage.dense_token_bytes
            per_row = max(row.budget * dense * row.seen_tokens, row.config.floor_tokens * dense)
            total += min(per_row, dense * row.seen_tokens) * row.window_keys.shape[0] * row.num_heads
        return total

    def dense_bytes(self) -> int:
        """What a `DynamicCache` would hold for this layer's tokens (keys and values; with a
        padded batch, the padding too)."""
        if not self.is_initialized:
            return 0
        batch = self.batch_size if self.rows is not None or self._rows_prompt is not None else self.window_keys.shape[0]
        return batch * self.num_heads * self.seen_tokens * self.storage.dense_token_bytes

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` restores exactly the cache that never saw the cropped tokens: only
        with lossless storage (every token, every group, the model's dtype). A lossy layer may
        have packed, evicted or re-selected tokens because of the tokens to crop, so assisted
        decoding and prompt lookup are refused with it (transformers checks this flag)."""
        lossy = (
            self.policy.evicts
            or self.config.bits is not None
            or (self.fixed_keep_groups or 0) < self.config.num_groups
        )
        return not lossy

    def _apply(self, fn) -> None:
        """Replace every held tensor `t` (batch first) by `fn(t)`."""
        if self.rows is not None:
            raise RuntimeError("a layer stored row by row moves its rows, not its tensors")
        if not self.is_initialized:
            return
        self._flush()
        for name in self._HELD:
            held = getattr(self, name)
            if held is not None:
                setattr(self, name, map_stored(held, fn))

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
        if self.rows is not None:
            for row in self.rows:
                row.offload()
            return
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.rows is not None:
            for row in self.rows:
                row.prefetch()
            return
        if self.is_initialized and self.packed_keys.device != self.device:
            self._apply(lambda t: t.to(self.device, non_blocking=True))

    def _pick_rows(self, order: list[int]) -> None:
        """Rows in `order` (repeats allowed): a repeated row is a shallow copy, sharing tensors
        that no layer changes in place."""
        if self._rows_prompt is not None:
            self._split_rows(None)
        seen: set[int] = set()
        rows = []
        for i in order:
            rows.append(copy.copy(self.rows[i]) if i in seen else self.rows[i])
            seen.add(i)
        self.rows = rows
        self.batch_size = len(rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.rows is not None:
            return self._pick_rows(beam_idx.tolist())
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.rows is not None:
            return self._pick_rows([r for r in range(len(self.rows)) for _ in range(repeats)])
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.rows is not None:
            return self._pick_rows(torch.arange(len(self.rows))[indices.cpu()].tolist())
        self._apply(lambda t: t[indices, ...])

    def crop(self, length_or_removed: int) -> None:
        """Drop the newest tokens (assisted decoding); see `_CROP_TAKES_LENGTH` for the argument.

        Raises `ValueError` for a lossy layer (`is_croppable` is False): what it packed or
        evicted because of the cropped tokens cannot be restored."""
        if not self.is_croppable:
            raise ValueError(
                "this SubTokenCache's config is lossy, so it cannot roll back (crop) the tokens assisted "
                "decoding or prompt lookup rejected; use the 'lossless' preset or a DynamicCache for them"
            )
        if self.rows is not None:
            removed = self.seen_tokens - self._crop_keep(length_or_removed)
            for row in self.rows:
                row.crop(row.seen_tokens - removed if _CROP_TAKES_LENGTH else -removed)
            self.seen_tokens -= removed
            return
        self._flush()
        keep = self._crop_keep(length_or_removed)
        if keep >= self.seen_tokens or not self.is_initialized:
            return
        stored = self.packed_keys.shape[-2]
        if keep >= stored:
            self.window_keys = self.window_keys[..., : keep - stored, :].clone()
            self.window_values = self.window_values[..., : keep - stored, :].clone()
        else:
            self.packed_keys = first_tokens(self.packed_keys, keep)
            self._open_key_tokens = 0  # the cut block stays as it is; new tokens start a block
            self.packed_values = first_tokens(self.packed_values, keep)
            if self.group_idx is not None:
                self.group_idx = self.group_idx[..., :keep].clone()
            self.window_keys = self.window_keys[..., :0, :].clone()
            self.window_values = self.window_values[..., :0, :].clone()
        self.seen_tokens = keep

    def _crop_keep(self, length_or_removed: int) -> int:
        """Tokens `crop(length_or_removed)` keeps."""
        if _CROP_TAKES_LENGTH:
            keep = (
                length_or_removed
                if length_or_removed >= 0
                else self.seen_tokens + length_or_removed
            )
        else:
            if length_or_removed > 0:
                raise ValueError(
                    f"crop takes a negative number of tokens to remove, got {length_or_removed}"
                )
            keep = self.seen_tokens + length_or_removed
        if keep < 0:
            raise ValueError(f"cannot crop {self.seen_tokens} tokens to {keep}")
        return keep


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
    """Scores as stored: float32, +inf replaced by `FORCED_SCORE` so that `isfinite` marks valid slots."""
    return scores.float().nan_to_num(nan=float("-inf"), posinf=FORCED_SCORE, neginf=float("-inf"))
