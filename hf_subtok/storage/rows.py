"""A batch stored row by row: each row's real tokens in a layer of its own, budgeted, scored and
packed as if its prompt ran alone; once the prompts are packed, rows that made the same choices
are stacked into one layer (`storage.row_groups`) (`SubTokenLayer` inherits these methods)."""

from __future__ import annotations

import copy
import dataclasses

import torch

from hf_subtok.storage.row_groups import row_signature, stack_rows, unstack_row
from hf_subtok.views import BatchRowsKV, PrefillKV


class BatchRows:
    """The `SubTokenLayer` methods of a batch stored row by row (`self.rows`: layers holding the
    batch rows `self.row_index` names, one row each or a group sharing a plan)."""

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
            row = type(self)(
                self.config, self.fixed_keep_groups, self.policy,
                None if self.planner is None else self.planner.for_row(r), self.layers_sharing, self.key_basis,
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
        self._hold_rows(rows)

    def _hold_rows(self, rows: list) -> None:
        """Hold one layer per batch row, to be stacked by plan once their prompts are packed."""
        self.rows = rows
        self.row_index = [torch.tensor([r], device=self.device) for r in range(len(rows))]
        self._stack_due = True

    def _stack_ready_rows(self) -> None:
        """Stack the rows that share a plan (`row_groups.row_signature`), once every row's prompt
        is packed; the rows stay in batch order within each group, groups by their first row."""
        if not all(row.is_initialized and row._prompt is None and row._pending is None for row in self.rows):
            return
        if any(row.policy.evicts and row._window_cap is None for row in self.rows):
            return  # a context still held dense: its rows are scored when it crosses the floor
        self._stack_due = False
        groups: dict = {}
        for r, row in enumerate(self.rows):
            signature = row_signature(row)
            groups.setdefault(r if signature is None else signature, []).append(r)
        if len(groups) == len(self.rows):
            return
        members = sorted(groups.values())
        self.rows = [self.rows[m[0]] if len(m) == 1 else stack_rows([self.rows[r] for r in m]) for m in members]
        self.row_index = [torch.tensor(m, device=self.device) for m in members]

    def _update_rows(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Each row's layer stores its `[1, Hkv, T, D]` row; attention reads the rows' views."""
        if self._rows_prompt is not None:  # the prompt's attention never reported back
            self._split_rows(None)
        if self._stack_due:
            self._stack_ready_rows()
        self.seen_tokens += key_states.shape[-2]
        if len(self.rows) == 1:  # every row in one layer, in batch order
            views = [self.rows[0].update(key_states, value_states)]
        else:
            views = [
                row.update(key_states.index_select(0, index), value_states.index_select(0, index))
                for row, index in zip(self.rows, self.row_index, strict=True)
            ]
        view = BatchRowsKV(tuple(k for k, _ in views), tuple(v for _, v in views), tuple(self.row_index))
        return view, view

    def leaf_layers(self) -> list:
        """The layers holding tensors: this one, or one per batch row."""
        if self.rows is None:
            return [self] if self.is_initialized and self._rows_prompt is None else []
        return self.rows

    def _pick_rows(self, order: list[int]) -> None:
        """Rows in `order` (repeats allowed): a repeated row is a shallow copy sharing the
        tensors layers replace, with its own copy of the token scores (updated in place)."""
        if self._rows_prompt is not None:
            self._split_rows(None)
        alone = self.row_layers()
        seen: set[int] = set()
        rows = []
        for i in order:
            rows.append(_copy_row(alone[i]) if i in seen else alone[i])
            seen.add(i)
        self._hold_rows(rows)
        self.batch_size = len(rows)

    def row_layers(self) -> list:
        """A layer per batch row, in batch order: a row stored alone is its own layer, a row of
        a stacked group a copy taken out of it (for inspection and batch reordering); a layer
        holding one sequence is its own row."""
        if self.rows is None:
            return self.leaf_layers()
        alone = [None] * self.batch_size
        for row, index in zip(self.rows, self.row_index, strict=True):
            members = index.tolist()
            for position, r in enumerate(members):
                alone[r] = row if len(members) == 1 else unstack_row(row, position)
        return alone


def _copy_row(row):
    """A shallow copy of a row's layer whose in-place state (the token scores, the window's
    buffers) is its own."""
    twin = copy.copy(row)
    twin.room = {}  # the original appends into the shared buffer's room; the twin into a buffer of its own
    if twin.token_scores is not None:
        twin.token_scores = twin.token_scores.clone()
    if twin.window is not None:
        twin.window = twin.window.copy()
    return twin
