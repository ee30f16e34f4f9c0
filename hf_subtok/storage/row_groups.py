"""Rows of a batch that share a plan, stored and attended as one batched layer.

A batch of several prompts is stored row by row (`storage.rows`): each row is budgeted, scored
and planned as if its prompt ran alone. Once every row has packed its prompt, rows whose layers
made the same choices (K, precision, bytes, tokens held, window) hold tensors of the same shape
and take the same decisions from then on: their tensors are stacked along the batch into one
layer, so that a decode step makes one pass over the group instead of one per row.

A layer whose later decisions would read more than its own row is never stacked: wide tokens
(adaptive span: how many to widen is the least over the rows), shared per-head rows, per-channel
keys of an evicting layer (the tables kept depend on which tokens survive in every row). A stacked
layer counts the shared rotation matrices per row as a row alone does (`rows_alone`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from hf_subtok.quant.stored import Stored, stored_components
from hf_subtok.storage.window import DenseWindow

# attributes that are not the row's own decisions: shared objects, per-row helpers, transients
_NOT_COMPARED = frozenset(
    {"config", "policy", "planner", "window", "rows", "row_index", "_rows_prompt", "_pending", "_prompt",
     "_rotation_for", "_rotation_matrices", "rows_alone", "room"}
)


def row_signature(row) -> tuple | None:
    """What must match for `row` to be stacked with another row's layer: the shapes (after the
    batch dim) and dtypes of every tensor it holds, and every other attribute's value. None when
    the row cannot be stacked (see the module docstring). Asked of rows whose prompts are packed
    (`BatchRows._stack_ready_rows`)."""
    if row._widens() or row.shares_rows or (row.policy.evicts and row.storage.channel_keys):
        return None
    held = tuple((name, _stored_signature(getattr(row, name))) for name in row._HELD)
    window = row.window
    window_shapes = tuple((name, tuple(t.shape[1:]), t.dtype) for name, t in window.buffers().items())
    other = []
    for name, value in sorted(vars(row).items()):
        if name in _NOT_COMPARED or name in row._HELD:
            continue
        if isinstance(value, torch.Tensor):
            return None  # a tensor this module does not know how to stack: never guess
        try:
            hash(value)
        except TypeError:
            value = repr(value)
        other.append((name, value))
    return held, (window.length, window.capacity, window_shapes), tuple(other)


def _stored_signature(held: Stored | None):
    if held is None:
        return None
    parts = [(tuple(t.shape[1:]), t.dtype) for t in stored_components(held)]
    plain = (int, float, str, bool)  # bits, block sizes: what a stored tensor holds besides its tensors and shared parts
    extra = {} if torch.is_tensor(held) else {k: v for k, v in vars(held).items() if isinstance(v, plain)}
    return type(held).__name__, tuple(sorted(extra.items())), tuple(parts)


def cat_batch(parts: Sequence[Stored]) -> Stored:
    """Stored tensors of equal shapes after the batch dim, concatenated along the batch."""
    if torch.is_tensor(parts[0]):
        return torch.cat(list(parts), dim=0)
    components = [iter(stored_components(part)) for part in parts]  # in the order `apply` visits them
    return parts[0].apply(lambda _: torch.cat([next(c) for c in components], dim=0))


def stack_rows(rows: Sequence) -> object:
    """One layer holding `rows` (layers of equal `row_signature`) along its batch, in order."""
    stacked = copy.copy(rows[0])
    for name in stacked._HELD:
        if getattr(stacked, name) is not None:
            setattr(stacked, name, cat_batch([getattr(row, name) for row in rows]))
    stacked.window = DenseWindow.stack([row.window for row in rows])
    stacked.rows_alone = True
    stacked.room = {}  # the stacked tensors are new: appends start a buffer of their own
    return stacked


def unstack_row(stacked, position: int) -> object:
    """Row `position` of a stacked layer, as a layer of its own (its tensors copied out)."""
    row = copy.copy(stacked)
    row.window = copy.copy(stacked.window)
    row._apply(lambda t: t[position : position + 1].clone())  # [1, ...]: nothing shared with the group
    return row
