"""`DenseWindow`: a layer's newest tokens, dense, in buffers written in place.

A decode step appends one token to the window and attention reads the window as it is: the
buffers hold `capacity` tokens, the new token is copied after the last one held (one
`copy_` per tensor, no concatenation, no allocation), and attention gets views of the tokens
held. Only when the tokens do not fit (a pack is due, or a prompt chunk) is a fresh tail built;
the layer then packs its oldest tokens and `hold`s the rest, which are written back to the
front of the buffers (once per pack, never more than `capacity` tokens).

Until the layer `reserve`s a capacity (a context up to `floor_tokens`, held exactly as a
`DynamicCache` would), the buffers hold exactly the tokens seen: no slack, so the bytes held
are the dense bytes.
"""

from __future__ import annotations

import copy

import torch


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class DenseWindow:
    """Keys and values `[B, Hkv, Tw, D]` of the newest tokens, and, for a layer that evicts,
    their float32 scores `[B, Hkv, Tw]` (the attention they received), held in buffers of
    `capacity` tokens (`[B, Hkv, capacity, D]` and `[B, Hkv, capacity]`)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None = None):
        self._keys, self._values, self._scores = keys, values, scores  # the buffers
        self.length = keys.shape[-2]  # tokens held
        self.capacity: int | None = None  # None: buffers sized to the tokens held

    @property
    def keys(self) -> torch.Tensor:
        """`[B, Hkv, Tw, D]` the keys held (a view of the buffer)."""
        return self._keys[..., : self.length, :]

    @property
    def values(self) -> torch.Tensor:
        return self._values[..., : self.length, :]

    @property
    def scores(self) -> torch.Tensor | None:
        """`[B, Hkv, Tw]` float32 scores of the tokens held, or None (a layer that never evicts)."""
        return None if self._scores is None else self._scores[..., : self.length]

    def buffers(self) -> dict[str, torch.Tensor]:
        """The tensors held, whole (their bytes are the window's bytes), by name."""
        held = {"window_keys": self._keys, "window_values": self._values}
        if self._scores is not None:
            held["window_scores"] = self._scores
        return held

    def reserve(self, capacity: int) -> None:
        """Hold up to `capacity` tokens in place from now on (the buffers grow at the next `hold`)."""
        self.capacity = capacity

    def fits(self, tokens: int) -> bool:
        """Whether `tokens` more tokens can be written in place."""
        return self.capacity is not None and self.length + tokens <= self._keys.shape[-2] and _writable(self._keys)

    def extend(
        self, keys: torch.Tensor, values: torch.Tensor, in_place: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The held tokens followed by `[B, Hkv, T, D]` new ones (and their scores, zero): written
        in place and returned as views when they fit and `in_place`; otherwise a fresh tail (the
        window unchanged: the caller `hold`s what it keeps of it)."""
        new = keys.shape[-2]
        if in_place and self.fits(new) and not _records_grad(keys, values):
            end = self.length + new
            self._keys[..., self.length : end, :].copy_(keys)
            self._values[..., self.length : end, :].copy_(values)
            if self._scores is not None:
                self._scores[..., self.length : end].zero_()
            self.length = end
            return self.keys, self.values, self.scores
        tail_scores = None
        if self._scores is not None:
            zeros = self._scores.new_zeros(*self._scores.shape[:2], new)
            tail_scores = torch.cat([self.scores, zeros], dim=-1)  # [B, Hkv, Tw + T]
        if self.length == 0:  # nothing held (a prompt): the new tokens themselves
            return keys, values, tail_scores
        tail_keys = torch.cat([self.keys, keys], dim=-2)  # [B, Hkv, Tw + T, D]
        tail_values = torch.cat([self.values, values], dim=-2)
        return tail_keys, tail_values, tail_scores

    def hold(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Hold exactly these `[B, Hkv, n, D]` tokens (and `[B, Hkv, n]` scores). Within the
        capacity they are copied to the front of the buffers (a source inside the buffers is
        copied out first); without one they become the buffers, copied only when they are
        views of a larger tensor (a slice would keep the whole of it alive)."""
        tokens = keys.shape[-2]
        if self.capacity is None or tokens > self.capacity or _records_grad(keys, values):
            self._keys, self._values = _own(keys), _own(values)
            self._scores = None if scores is None else _own(scores)
            self.length = tokens
            return
        if (
            self._keys.shape[-2] != self.capacity
            or self._keys.shape[:2] != keys.shape[:2]
            or not _writable(self._keys)
            or (scores is not None and self._scores is None)
        ):
            # zeros, not empty: the slots not yet written are held bytes like the others, and a
            # cache's tensors are then the same from run to run
            self._keys = keys.new_zeros(*keys.shape[:2], self.capacity, keys.shape[-1])
            self._values = values.new_zeros(*values.shape[:2], self.capacity, values.shape[-1])
            if scores is not None:
                self._scores = scores.new_zeros(*scores.shape[:2], self.capacity)
        elif keys.data_ptr() == self._keys.data_ptr() and tokens <= self.length:
            self.length = tokens  # already the first tokens held
            return
        for buffer, source in ((self._keys, keys), (self._values, values), (self._scores, scores)):
            if source is None or buffer is None:
                continue
            if _shares_memory(source, buffer):
                source = source.clone()  # moving tokens within the buffer: never overlap the copy
            buffer[..., :tokens].copy_(source) if source.dim() == 3 else buffer[..., :tokens, :].copy_(source)
        self.length = tokens

    def truncate(self, tokens: int) -> None:
        """Keep the `tokens` oldest tokens held."""
        self.length = min(self.length, tokens)

    @staticmethod
    def stack(windows: list[DenseWindow]) -> DenseWindow:
        """Windows holding the same number of tokens in buffers of the same shape, one per batch
        row (or group), as one window along the batch."""
        first = windows[0]
        stacked = copy.copy(first)  # the same length and capacity
        stacked._keys = torch.cat([w._keys for w in windows])  # [B, Hkv, capacity, D]
        stacked._values = torch.cat([w._values for w in windows])
        stacked._scores = None if first._scores is None else torch.cat([w._scores for w in windows])
        return stacked

    def copy(self) -> DenseWindow:
        """A window holding copies of these buffers (a row duplicated for beams writes its own)."""
        twin = copy.copy(self)
        twin.map(torch.clone)
        return twin

    def map(self, fn) -> None:
        """Replace each buffer `t` (batch first) by `fn(t)` (beam reordering, batch selection)."""
        self._keys, self._values = fn(self._keys), fn(self._values)
        if self._scores is not None:
            self._scores = fn(self._scores)


def _writable(buffer: torch.Tensor) -> bool:
    """Whether `buffer` may be written in place now (a tensor made under `inference_mode` may
    not be, outside it: the window then moves to fresh buffers)."""
    return not buffer.is_inference() or torch.is_inference_mode_enabled()


def _records_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records on these tensors: the window then keeps fresh tensors (an in-place
    write would change what the backward pass saved)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a copy of it when it is a view into a larger storage."""
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor
