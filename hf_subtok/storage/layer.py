"""`SubTokenLayer`: one layer's packed KV storage, on transformers' `CacheLayerMixin` contract."""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from hf_subtok.config import SubTokenConfig
from hf_subtok.formats import StorageFormat
from hf_subtok.quant.pre_rope_keys import KeyBasis
from hf_subtok.quant.stored import map_stored
from hf_subtok.storage.eviction import Eviction, PromptEvidence
from hf_subtok.storage.held import HeldBytes
from hf_subtok.storage.packing import Packing
from hf_subtok.storage.rollback import Rollback
from hf_subtok.storage.rows import BatchRows
from hf_subtok.storage.tensors import Stored
from hf_subtok.storage.window import DenseWindow


class SubTokenLayer(BatchRows, Eviction, Packing, HeldBytes, Rollback, CacheLayerMixin):
    """Packed storage of one attention layer.

    Holds, for the oldest tokens, whole keys `[B, Hkv, Ts, D]`, the kept value groups
    `[B, Hkv, K, Ts, C]` and their uint8 group indices `[B, Hkv, K, Ts]`; for the newest tokens,
    a dense window `[B, Hkv, Tw, D]` of keys and values (`Tw <= window`). When the window
    overflows, its oldest tokens are packed `pack_chunk` at a time. No dense copy of packed
    values exists anywhere.

    The first `update` (empty cache) returns the dense prompt so prefill attention is exact;
    later updates return a `PackedKV` for the attention function registered by
    `hf_subtok.attention`.

    The layer owns the bytes and the layout; what to keep it asks its `policy` (scores,
    plans, which tokens fit), and its prompt's share of the cross-layer plan comes from the
    cache. The methods are grouped by role: `storage.packing` (store, pack, re-select),
    `storage.eviction` (an evicting layer's prompt and window chunks), `storage.rows` (a batch
    stored row by row), `storage.held` (what it holds, counted from its tensors),
    `storage.rollback` (`crop`); this class keeps the rest of transformers' `CacheLayerMixin`
    contract.

    With an evicting policy (a budget that may cut tokens), each KV head keeps its own best
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
        key_basis: KeyBasis | None = None,
    ):
        super().__init__()
        self.config = config
        # how per-channel keys are stored before RoPE (`quant.pre_rope_keys`), with key_space='pre_rope'
        self.key_basis = key_basis
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
        # the batch rows each of `rows` holds, ascending (several: rows sharing a plan, `storage.row_groups`)
        self.row_index: list[torch.Tensor] | None = None  # each [n] int64
        self.rows_alone = False  # rows stacked along the batch, each budgeted as if alone
        self._stack_due = False  # rows not yet stacked by plan (`storage.rows`)
        # buffers the packed store grows into, by held name (`storage.growth`); their room is held
        self.room: dict[str, Stored] = {}
        self._rows_prompt: tuple[torch.Tensor, torch.Tensor] | None = None
        self.packed_keys: Stored | None = None  # a `QuantizedTensor` with `config.bits`
        self.packed_values: Stored | None = None
        self.group_idx: torch.Tensor | None = None
        self.window: DenseWindow | None = None  # the newest tokens, dense (`storage.window`)
        self.token_scores: torch.Tensor | None = None
        # adaptive span: the other groups of the first W packed tokens (`hf_subtok.storage.wide`)
        self.wide_values: Stored | None = None  # [B, Hkv, G-K, W, C]
        self.wide_idx: torch.Tensor | None = None  # [B, Hkv, G-K, W] uint8
        self.wide_norms: torch.Tensor | None = None  # [B, Hkv, W] float16
        self.wide_fraction = 0.0  # share of the packed tokens the plan widens
        # per-head budgets: packed tokens of all heads share one row, each naming its head
        self.stored_heads: torch.Tensor | None = None  # [B, 1, Ts] uint8
        self.keep_groups = self.fixed_keep_groups
        # bytes this layer may hold per dense byte of the tokens seen: the config's budget until a
        # cross-layer plan gives the layer its share; `target_bytes` is the one place it becomes bytes
        self.dense_share = self.config.budget
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
        window_scores = None
        self.num_heads = heads
        if self.policy.evicts:
            rows = 1 if self.shares_rows else heads
            self.token_scores = torch.empty(
                batch, rows, 0, dtype=torch.float32, device=self.device
            )
            if self.shares_rows:
                self.stored_heads = torch.empty(batch, 1, 0, dtype=torch.uint8, device=self.device)
            window_scores = torch.empty(batch, heads, 0, dtype=torch.float32, device=self.device)
        self.window = DenseWindow(
            key_states.new_empty(batch, heads, 0, head_dim), value_states.new_empty(batch, heads, 0, head_dim), window_scores
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
        new = key_states.shape[-2]
        # written in place unless a pack is due (the packed tokens leave the window before attention reads it)
        packs = self._tokens_to_pack(self.window.length + new) > 0
        tail_keys, tail_values, _ = self.window.extend(key_states, value_states, in_place=not packs)  # [B, Hkv, Tw + T, D]
        self.seen_tokens += new
        if self.seen_tokens <= self.config.floor_tokens and self.packed_keys.shape[-2] == 0:
            self.window.hold(tail_keys, tail_values)  # short: kept exactly
            return tail_keys, tail_values
        # nothing packed yet (the prompt, or a context crossing the floor): exact dense attention
        view = None if self.packed_keys.shape[-2] == 0 else self._view(tail_keys, tail_values)
        self._store_tail(tail_keys, tail_values)
        if view is None:
            return tail_keys, tail_values
        return view, view

    @property
    def keys(self) -> torch.Tensor | None:
        """`[B, Hkv, T, D]` dense keys, as a `DynamicLayer` has them, while this layer holds
        every token dense (nothing packed yet: a context up to `floor_tokens`); None before the
        first token. Once tokens are packed, reading it raises `AttributeError` saying so: the
        packed storage is read by the 'hf_subtok' attention function (`stored_tensors()` lists it)."""
        return self._dense_part("keys")

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:  # transformers' `CacheLayerMixin.__init__` sets None
            raise AttributeError("SubTokenLayer.keys is read-only: store tokens with update()")

    @property
    def values(self) -> torch.Tensor | None:
        """`[B, Hkv, T, D]` dense values while nothing is packed (see `keys`)."""
        return self._dense_part("values")

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("SubTokenLayer.values is read-only: store tokens with update()")

    def _dense_part(self, name: str) -> torch.Tensor | None:
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
        return getattr(self.window, name)

    @property
    def window_keys(self) -> torch.Tensor | None:
        """`[B, Hkv, Tw, D]` keys of the dense window (a view of its buffer), None before the first token."""
        return None if self.window is None else self.window.keys

    @property
    def window_values(self) -> torch.Tensor | None:
        return None if self.window is None else self.window.values

    @property
    def window_scores(self) -> torch.Tensor | None:
        """`[B, Hkv, Tw]` float32 scores of the window's tokens (a layer that evicts), else None."""
        return None if self.window is None else self.window.scores

    @property
    def lossless(self) -> bool:
        """Whether this layer stores every token, every group, in the model's dtype."""
        return not (
            self.policy.evicts
            or self.config.bits is not None
            or (self.fixed_keep_groups or 0) < self.config.num_groups
        )

    def _apply(self, fn) -> None:
        """Replace every held tensor `t` (batch first) by `fn(t)`."""
        if self.rows is not None:
            raise RuntimeError("a layer stored row by row moves its rows, not its tensors")
        if not self.is_initialized:
            return
        self._flush()
        self.room = {}  # the held tensors are replaced: the next append starts a buffer of its own
        for name in self._HELD:
            held = getattr(self, name)
            if held is not None:
                setattr(self, name, map_stored(held, fn))
        self.window.map(fn)

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

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.rows is not None:
            return self._pick_rows(beam_idx.tolist())
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.rows is not None:
            return self._pick_rows([r for r in range(self.batch_size) for _ in range(repeats)])
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.rows is not None:
            return self._pick_rows(torch.arange(self.batch_size)[indices.cpu()].tolist())
        self._apply(lambda t: t[indices, ...])
