"""Eviction over time: a `SubTokenLayer` that evicts tokens scores its prompt after the exact
prefill attention, packs it within its bytes (or its share of the cross-layer plan), then
accumulates attention while decoding and packs window chunks (`SubTokenLayer` inherits these
methods; what to keep its policy says)."""

from __future__ import annotations

import dataclasses

import torch

from hf_subtok.formats import SCORE_BYTES, StorageFormat
from hf_subtok.storage.packing import _finite_top
from hf_subtok.storage.tensors import ObservedQueries, fidelity_of, quantization_norms
from hf_subtok.views import PrefillKV


@dataclasses.dataclass(frozen=True)
class PromptEvidence:
    """A layer's scored prompt: `[B, Hkv, T, D]` keys/values, `[B, Hkv, T]` token scores,
    `[B, Hkv, n_pack, G]` group scores of the `n_pack` oldest tokens (those to pack), and the
    precisions a plan may pick with their fidelity (weighed by the queries that observed the
    prompt, when it was observed), measured once for the split and the pack."""

    keys: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    group_scores: torch.Tensor
    n_pack: int
    choices: list[tuple[StorageFormat, float]]


class Eviction:
    """The `SubTokenLayer` methods of a layer whose policy evicts tokens (and the byte
    arithmetic of its budget)."""

    def _update_evicting(self, key_states: torch.Tensor, value_states: torch.Tensor):
        new = key_states.shape[-2]
        self.seen_tokens += new
        # `[B, Hkv, Tw + T, D]`, written into the window in place while it has room
        tail_keys, tail_values, tail_scores = self.window.extend(key_states, value_states)
        self._pending = (tail_keys, tail_values, tail_scores)
        if self._window_cap is None:  # nothing packed yet: exact attention, then score
            # a context up to `floor_tokens` stays dense; past it the whole context is scored
            # and packed as a prompt of that length would be
            short = self.seen_tokens <= self.config.floor_tokens
            observer = self._hold_dense if short else self._finish_prefill
            view = PrefillKV(tail_keys, tail_values, observer, self.config.obs_window)
            return view, view
        view = self._view(
            tail_keys,
            tail_values,
            stored_valid=self._valid_slots(),
            observer=self._finish_step,
            mass_queries=self.config.obs_window,
        )
        return view, view

    def _valid_slots(self) -> torch.Tensor:
        """`[B, Hkv, Ts]` bool: which packed slots hold a token (not a filler) of each head.
        Derived when asked, not held: a held mask would be bytes outside the budget. With
        shared rows, a head's slots are the tokens naming it."""
        # stored scores are finite or -inf (`packing._finite_top`); one op, where isfinite runs four
        valid = self.token_scores > float("-inf")  # [B, 1 or Hkv, Ts]
        if self.shares_rows:
            heads = torch.arange(self.num_heads, device=self.device).view(1, -1, 1)
            valid = valid & (self.stored_heads.long() == heads)  # [B, Hkv, Ts]
        return valid

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
        keys, values, _ = self._pending
        self._pending = None
        self.window.hold(keys, values)

    def _finish_prefill(self, observation) -> None:
        """Score the prompt's tokens and groups, plan this layer's budget, pack."""
        keys, values, _ = self._pending
        self._pending = None
        scores = self.policy.score_tokens(keys, values, observation)  # [B, Hkv, T]
        n_pack = self._tokens_to_pack(keys.shape[-2])
        group_scores = self._score_groups(
            keys[..., :n_pack, :], values[..., :n_pack, :], scores[..., :n_pack]
        )
        observed = None
        if observation is not None:
            observed = ObservedQueries(observation.queries, observation.scaling, observation.key_valid)
        choices = self._storage_choices(keys[..., :n_pack, :], values[..., :n_pack, :], observed)
        self._prompt = PromptEvidence(keys, values, scores, group_scores, n_pack, choices)
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
            prompt.choices,
            self._plan_candidates(),
        )

    def prompt_row_bytes(self) -> float:
        """Bytes per (batch, head) row this layer's own budget gives its packed prompt tokens."""
        return self._packed_row_bytes(self._window_cap)

    def pack_prompt(self, row_bytes: float | None) -> None:
        """Pack the scored prompt within `row_bytes` bytes per row (None: this layer's budget);
        the layer's `dense_share` then becomes the share it was given."""
        prompt, self._prompt = self._prompt, None
        if row_bytes is not None:
            dense = self.storage.dense_token_bytes
            self.dense_share = (row_bytes + self._window_cap * (dense + SCORE_BYTES)) / (
                dense * self.seen_tokens
            )
        n_pack = prompt.n_pack
        keys, values, scores = prompt.keys, prompt.values, prompt.scores
        self._pack_selected(
            keys[..., :n_pack, :],
            values[..., :n_pack, :],
            scores[..., :n_pack],
            prompt.group_scores,
            choices=prompt.choices,
        )
        self.window.reserve(self._window_cap)  # decode steps write the window in place
        self.window.hold(keys[..., n_pack:, :], values[..., n_pack:, :], _finite_top(scores[..., n_pack:]))

    def _finish_step(self, mass: torch.Tensor | None) -> None:
        """Accumulate this step's attention mass, then keep the budget while packing overflow."""
        tail_keys, tail_values, tail_scores = self._pending  # tail scores: zero for the new tokens
        self._pending = None
        stored = self.packed_keys.shape[-2]
        if mass is not None:
            stored_mass = mass[..., :stored]  # [B, Hkv, Ts]
            if self.shares_rows:  # each token's own head
                stored_mass = stored_mass.gather(1, self.stored_heads.long())  # [B, 1, Ts]
            if self.token_scores.is_inference() and not torch.is_inference_mode_enabled():
                self.token_scores = self.token_scores.clone()  # once: a cache filled under inference_mode
            self.token_scores.add_(stored_mass)  # in place: no copy of the scores per step
            tail_scores.add_(mass[..., stored:])  # the window's own scores when written in place
        n_pack = self._tokens_to_pack(tail_keys.shape[-2])
        if n_pack:
            self._pack_selected(
                tail_keys[..., :n_pack, :],
                tail_values[..., :n_pack, :],
                tail_scores[..., :n_pack],
                None,
            )
            self.window.reserve(self._window_cap)
        self.window.hold(tail_keys[..., n_pack:, :], tail_values[..., n_pack:, :], tail_scores[..., n_pack:])

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
        """Dense tokens allowed: `window`, shrunk so it never takes more than half of what the
        budget leaves after the shared rotation matrices (the window's buffers hold this many
        tokens whether full or not)."""
        dense = self.storage.dense_token_bytes
        own = max(self.target_bytes() - self._shared_bytes_per_row(), 0.0)
        affordable = int(0.5 * own // (dense + SCORE_BYTES))
        return min(self.config.window, affordable)

    def target_bytes(self) -> float:
        """Bytes one (batch, head) row of this layer may hold: its `dense_share` of the dense
        bytes of the tokens seen, and never less than `floor_tokens` dense tokens' bytes."""
        dense = self.storage.dense_token_bytes
        return max(self.dense_share * dense * self.seen_tokens, self.config.floor_tokens * dense)

    def _floor_binds(self) -> bool:
        """Whether `floor_tokens`, not `budget`, sets this layer's bytes now."""
        return self.dense_share * self.seen_tokens < self.config.floor_tokens

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

    def _packed_row_bytes(self, window_tokens: int) -> float:
        """Bytes one (batch, head) row may spend on packed tokens with `window_tokens` dense."""
        dense = self.storage.dense_token_bytes
        return self.target_bytes() - window_tokens * (dense + SCORE_BYTES) - self._shared_bytes_per_row()

    def _shared_bytes_per_row(self) -> float:
        """This layer's share, per (batch, head) row, of the rotation matrices all layers share
        (`[D, D]` and `[C, C]` float32), when any format it may pick is rotated, and of its own
        pre-RoPE key bases, when any format holds keys in them."""
        formats = self.config.storage_formats(self.head_dim, self.storage.elem_bytes)
        matrices = 4 * self.head_dim**2 if any(f.rotates_keys for f in formats) else 0
        matrices += 4 * self.storage.width**2 if any(f.rotates for f in formats) else 0
        bases = 0
        if any(f.pre_rope_keys for f in formats):
            bases = sum(t.numel() * t.element_size() for t in self.key_basis.tensors().values())
        batch = 1 if self.rows_alone else self.window_keys.shape[0]  # rows stacked: each counts as alone
        return (matrices / self.layers_sharing + bases) / (batch * self.num_heads)

    def _storage_choices(
        self, keys: torch.Tensor, values: torch.Tensor, observed: ObservedQueries | None
    ) -> list[tuple[StorageFormat, float]]:
        """The precisions the plan may pick, each with its fidelity on these keys and values
        (as the `observed` queries would read them, when given)."""
        formats = self.config.storage_formats(self.head_dim, self.storage.elem_bytes)
        trials = [f for f in formats if f.bits is not None]
        if len(formats) == 1 or not trials or keys.shape[-2] == 0:
            return [(f, 1.0) for f in formats]
        # every trial's norms read on the host in one transfer, not four syncs per format
        norms = [
            quantization_norms(keys, values, f, observed=observed, basis=self.key_basis, first_position=self.packed_positions)
            for f in trials
        ]
        norms = iter(torch.stack(norms).double().tolist())
        return [(f, 1.0 if f.bits is None else fidelity_of(next(norms))) for f in formats]

    def _plan_candidates(self) -> list[int]:
        if self.fixed_keep_groups:
            return [self.fixed_keep_groups]
        if self.config.axes == "tokens":
            return [self.config.num_groups]
        return list(range(1, self.config.num_groups + 1))
