"""A padded batch stored row by row: each row's real tokens in a layer of its own, budgeted,
scored and packed as if its prompt ran alone (`SubTokenLayer` inherits these methods)."""

from __future__ import annotations

import copy
import dataclasses

import torch

from hf_subtok.views import BatchRowsKV, PrefillKV


class BatchRows:
    """The `SubTokenLayer` methods of a batch stored row by row (`self.rows`: a layer per row)."""

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
        seen: set[int] = set()
        rows = []
        for i in order:
            rows.append(_copy_row(self.rows[i]) if i in seen else self.rows[i])
            seen.add(i)
        self.rows = rows
        self.batch_size = len(rows)


def _copy_row(row):
    """A shallow copy of a row's layer whose in-place state (the token scores, the window's
    buffers) is its own."""
    twin = copy.copy(row)
    if twin.token_scores is not None:
        twin.token_scores = twin.token_scores.clone()
    if twin.window is not None:
        twin.window = twin.window.copy()
    return twin
