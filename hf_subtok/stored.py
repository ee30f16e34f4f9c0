"""Token-dim operations on what a layer stores: plain tensors or `QuantizedTensor`s alike.

Every operation here acts on leading dims only (tokens, heads, batch), so a
`QuantizedTensor` applies it to its payload, scales and zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hf_subtok.quant import QuantizedTensor, quantize

Stored = torch.Tensor | QuantizedTensor


def map_stored(x: Stored, fn: Callable[[torch.Tensor], torch.Tensor]) -> Stored:
    """`fn(x)`, or `fn` on each component of a `QuantizedTensor`."""
    return x.apply(fn) if isinstance(x, QuantizedTensor) else fn(x)


def cat_stored(parts: Sequence[Stored], dim: int) -> Stored:
    """`torch.cat` along a leading dim."""
    if isinstance(parts[0], QuantizedTensor):
        return QuantizedTensor.cat(parts, dim)
    return torch.cat(parts, dim=dim)


def take_tokens(x: Stored, index: torch.Tensor, dim: int) -> Stored:
    """Gather along `dim` with `index` shaped like `x` up to the last dim (broadcast over it)."""
    index = index.unsqueeze(-1)
    return map_stored(x, lambda t: torch.take_along_dim(t, index, dim=dim))


def maybe_quantize(x: torch.Tensor, bits: int | None, group_size: int) -> Stored:
    """`x` quantized along its last dim, or `x` itself when `bits` is None."""
    return x if bits is None else quantize(x, bits, group_size)


def stored_parts(name: str, x: Stored) -> dict[str, torch.Tensor]:
    """The tensors behind `x` by name (`name.payload`, ... for a `QuantizedTensor`)."""
    if isinstance(x, QuantizedTensor):
        return {f"{name}.{part}": t for part, t in x.tensors().items()}
    return {name: x}
