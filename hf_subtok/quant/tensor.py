"""`QuantizedTensor`: a tensor stored as bit-packed codes with a scale and zero per group."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hf_subtok.quant.bits import check_bits, unpack_bits
from hf_subtok.quant.gather import heads_into_rows, take_rows

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_one_device(parts: dict[str, torch.Tensor]) -> None:
    """Raise `ValueError` naming the components unless they are all on one device."""
    devices = {t.device for t in parts.values()}
    if len(devices) > 1:
        raise ValueError(
            f"{', '.join(parts)} must be on one device, got {', '.join(str(t.device) for t in parts.values())}"
        )


class PackedCodes(ABC):
    """What every quantized storage shares: codes bit-packed along the last dim of `payload`
    (`bits` per code), its logical shape, device and bytes. Subclasses define `payload`,
    `bits` and `tensors()`."""

    payload: torch.Tensor
    bits: int

    @property
    def shape(self) -> torch.Size:
        """The logical shape `[..., N]`: the payload's, with the last dim unpacked."""
        return torch.Size((*self.payload.shape[:-1], self.payload.shape[-1] * 8 // self.bits))

    @property
    def ndim(self) -> int:
        return self.payload.dim()

    def dim(self) -> int:
        return self.payload.dim()

    @property
    def device(self) -> torch.device:
        return self.payload.device

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored components by name, for memory accounting."""

    # The token operations every stored tensor supports, its tokens at dim -2 (`[..., T, N]`;
    # each class also has `cat(parts)`, concatenating along the tokens). A cache moves tokens
    # through these alone (`storage.tensors`), whatever the format.

    @abstractmethod
    def take(self, index: torch.Tensor) -> PackedCodes:
        """The tokens `index` (`[..., t]` int64 into the token dim, per leading row)."""

    @abstractmethod
    def token_prefix(self, stop: int) -> PackedCodes:
        """A view of the first `stop` tokens (no copy; shared tables stay shared)."""

    @abstractmethod
    def first_tokens(self, stop: int) -> PackedCodes:
        """The first `stop` tokens as a copy, so that the rest can be freed."""

    @abstractmethod
    def flatten_heads(self) -> PackedCodes:
        """`[B, H, ..., T, N]` as one row of every head's tokens, head-major `[B, 1, ..., H * T, N]`
        (rows shared by all KV heads: per-head token budgets)."""

    @property
    def nbytes(self) -> int:
        """Bytes of the storages behind the components (each storage counted once)."""
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in self.tensors().values()
        }
        return sum(storages.values())


@dataclass(frozen=True)
class QuantizedTensor(PackedCodes):
    """A logical `[..., N]` float tensor in `bits` bits with a scale and zero per `group_size`
    consecutive channels of the last dim: `x[..., n] ~= code[..., n] * scale[..., n // group_size]
    + zero[..., n // group_size]` (asymmetric; `zero` is in value units, the group's minimum).

    Every leading index (every token of a cache) carries its own scales, so any operation on
    the leading dims (cat along tokens, gather, index_select, slicing, `.to(device)`) is done by
    `apply`, on the three components alike. The last dim is never split or reordered.

    Attributes:
        payload: `[..., N * bits / 8]` uint8, codes packed along the last dim (see `quant.bits`).
        scale: `[..., N / group_size]` float16, bfloat16 or float32.
        zero: `[..., N / group_size]`, same dtype as `scale`.
        bits: 2, 4 or 8.
        group_size: channels sharing one scale and zero.
    """

    payload: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` (`TypeError` for non-tensors) unless the components fit together."""
        check_bits(self.bits)
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"group_size must be a positive int, got {size!r}")
        for name in ("payload", "scale", "zero"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(
                    f"{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}"
                )
        if self.payload.dtype != torch.uint8:
            raise ValueError(f"payload must be torch.uint8, got {self.payload.dtype}")
        if self.scale.dtype not in SCALE_DTYPES or self.zero.dtype != self.scale.dtype:
            raise ValueError(
                f"scale and zero must share a dtype in {SCALE_DTYPES}, got {self.scale.dtype} and {self.zero.dtype}"
            )
        if self.payload.dim() == 0 or self.scale.shape != self.zero.shape:
            raise ValueError(
                f"payload must be [..., N*bits/8] and scale, zero [..., N/group_size], got "
                f"{tuple(self.payload.shape)}, {tuple(self.scale.shape)}, {tuple(self.zero.shape)}"
            )
        channels = self.payload.shape[-1] * 8 // self.bits
        if (
            self.scale.shape[:-1] != self.payload.shape[:-1]
            or self.scale.shape[-1] * size != channels
        ):
            raise ValueError(
                f"scale {tuple(self.scale.shape)} must be [..., N/group_size] = "
                f"{(*self.payload.shape[:-1], channels // size)} for payload {tuple(self.payload.shape)} "
                f"at bits={self.bits}, group_size={size}"
            )
        check_one_device(self.tensors())

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The `[..., N]` tensor in `dtype` (computed in float32, then rounded once)."""
        *lead, channels = self.shape
        codes = unpack_bits(self.payload, self.bits)  # [..., N]
        groups = channels // self.group_size
        values = codes.reshape(*lead, groups, self.group_size).float()  # [..., N/gs, gs]
        values.mul_(self.scale.float().unsqueeze(-1)).add_(self.zero.float().unsqueeze(-1))
        return values.reshape(*lead, channels).to(dtype)  # [..., N]

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedTensor:
        """A new `QuantizedTensor` with `fn` applied to payload, scale and zero.

        `fn` may do anything to the leading dims (index, gather, cat with others, move to a
        device) but must leave the last dim alone: it differs between the components.
        """
        return QuantizedTensor(
            fn(self.payload), fn(self.scale), fn(self.zero), self.bits, self.group_size
        )

    def take(self, index: torch.Tensor) -> QuantizedTensor:
        dim = self.payload.dim() - 2
        return self.apply(lambda t: take_rows(t, index, dim))

    def token_prefix(self, stop: int) -> QuantizedTensor:
        return self.apply(lambda t: t[..., :stop, :])

    def first_tokens(self, stop: int) -> QuantizedTensor:
        return self.apply(lambda t: t[..., :stop, :].clone())

    def flatten_heads(self) -> QuantizedTensor:
        dim = self.payload.dim() - 2
        return self.apply(lambda t: heads_into_rows(t, dim))

    @staticmethod
    def cat(tensors: Sequence[QuantizedTensor], dim: int = -2) -> QuantizedTensor:
        """`torch.cat` of quantized tensors along a leading dim (by default the token dim)."""
        if not tensors:
            raise ValueError("tensors must be a non-empty sequence of QuantizedTensor")
        first = tensors[0]
        for i, other in enumerate(tensors):
            if not isinstance(other, QuantizedTensor):
                raise TypeError(
                    f"tensors[{i}] must be a QuantizedTensor, got {type(other).__name__}"
                )
            if (other.bits, other.group_size) != (first.bits, first.group_size):
                raise ValueError(
                    f"tensors[{i}] has bits={other.bits}, group_size={other.group_size}; "
                    f"tensors[0] has bits={first.bits}, group_size={first.group_size}"
                )
        ndim = first.ndim
        if not -ndim <= dim < ndim or dim % ndim == ndim - 1:
            raise ValueError(
                f"dim must be a leading dim of a {ndim}-d tensor (not the last), got {dim}"
            )
        return QuantizedTensor(
            torch.cat([t.payload for t in tensors], dim),
            torch.cat([t.scale for t in tensors], dim),
            torch.cat([t.zero for t in tensors], dim),
            first.bits,
            first.group_size,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored components by name, for memory accounting."""
        return {"payload": self.payload, "scale": self.scale, "zero": self.zero}

