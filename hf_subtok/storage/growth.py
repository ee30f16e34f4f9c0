"""A packed store that grows by capacity: tokens appended in place into spare room, the store
copied only when the room runs out, not at every pack.

What a layer holds (`packed_keys`, `packed_values`, `group_idx`) stays an ordinary stored tensor
of exactly the tokens held: a view of the first tokens of a buffer with room for more. A pack
writes its tokens after them in place while the buffer has room; otherwise the held tokens and
the new ones are copied into a buffer with `1 / SLACK_RATIO` of spare tokens. The first append
(the prompt's tokens, onto an empty store) is concatenated: the room comes with decoding. The buffer's spare
room is held memory and is counted (a store's bytes are its storages'). Plain tensors and
`QuantizedTensor`s (every component with its tokens at the same dim) grow this way; other
formats (per-channel keys, value codes) are concatenated as before.
"""

from __future__ import annotations

import torch

from hf_subtok.quant.stored import Stored, map_stored, stored_components
from hf_subtok.quant.tensor import QuantizedTensor
from hf_subtok.storage.tensors import cat_stored

SLACK_RATIO = 32  # spare tokens: 1/32 of the tokens held (at least one append's)


def grows_in_place(held: Stored) -> bool:
    """Whether `held`'s format grows by capacity (else it is concatenated)."""
    return isinstance(held, (torch.Tensor, QuantizedTensor))


def append_tokens(held: Stored, new: Stored, buffer: Stored | None, dim: int = -2) -> tuple[Stored, Stored]:
    """`(view, buffer)`: `held` followed by `new` along the token `dim` (negative), as a view of
    `buffer` when `held` is its prefix and its room fits `new`, else of a new buffer."""
    if not grows_in_place(held) or held.shape[dim] == 0:  # the prompt: held as it is
        return concat_tokens(held, new, dim), None
    count, extra = held.shape[dim], new.shape[dim]
    held_parts, new_parts = stored_components(held), stored_components(new)
    if buffer is not None:
        room = stored_components(buffer)
        if _is_prefix(held_parts, room) and room[0].shape[dim] >= count + extra:
            for target, part in zip(room, new_parts, strict=True):
                target.narrow(dim, count, extra).copy_(part)
            return _prefix(buffer, count + extra, dim), buffer
    spare = max(extra, (count + extra) // SLACK_RATIO)
    grown = iter(
        torch.cat([h, n, h.new_zeros(*h.shape[:dim % h.dim()], spare, *h.shape[dim % h.dim() + 1 :])], dim=dim)
        for h, n in zip(held_parts, new_parts, strict=True)
    )
    buffer = map_stored(held, lambda _: next(grown))
    return _prefix(buffer, count + extra, dim), buffer


def concat_tokens(held: Stored, new: Stored, dim: int = -2) -> Stored:
    """`held` followed by `new` along the token `dim`, in a new tensor."""
    return cat_stored([held, new]) if dim == -2 else torch.cat([held, new], dim=dim)


def _is_prefix(held: list[torch.Tensor], room: list[torch.Tensor]) -> bool:
    """Whether each held component is the start of the buffer's (the same memory, same strides)."""
    return all(h.data_ptr() == r.data_ptr() and h.stride() == r.stride() for h, r in zip(held, room, strict=True))


def _prefix(buffer: Stored, stop: int, dim: int) -> Stored:
    return map_stored(buffer, lambda t: t.narrow(dim, 0, stop))
