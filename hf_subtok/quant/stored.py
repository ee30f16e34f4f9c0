"""`Stored`: what a layer stores for keys or values (a plain tensor, or one of the quantized
tensors), and the operations on it that need nothing but the quantized tensors themselves (the
kernels use them too)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hf_subtok.quant.channel import ChannelQuantizedTensor
from hf_subtok.quant.codebook import CodedTensor
from hf_subtok.quant.pre_rope_keys import PreRopeKeys
from hf_subtok.quant.tensor import QuantizedTensor

Stored = torch.Tensor | QuantizedTensor | ChannelQuantizedTensor | CodedTensor | PreRopeKeys


def map_stored(x: Stored, fn: Callable[[torch.Tensor], torch.Tensor]) -> Stored:
    """`fn(x)`, or `fn` on each component of a quantized tensor; `fn` may only act on the
    dims before the token dim (batch reorders, device moves)."""
    return fn(x) if isinstance(x, torch.Tensor) else x.apply(fn)


def stored_components(x: Stored) -> list[torch.Tensor]:
    """The tensors behind `x`, in the order `map_stored` visits them (so that a list of new
    components can be mapped back in: `map_stored(x, lambda _: next(new))`)."""
    found: list[torch.Tensor] = []
    map_stored(x, lambda t: found.append(t) or t)
    return found


def token_prefix(x: Stored, stop: int) -> Stored:
    """A view of the first `stop` tokens of `[..., T, N]` storage (no copy; per-channel key
    tables are shared, not compacted)."""
    return x[..., :stop, :] if isinstance(x, torch.Tensor) else x.token_prefix(stop)
