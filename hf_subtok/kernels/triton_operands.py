"""Host-side operands of the Triton decode kernel: a mask as bytes, a stored tensor as
(payload, scale, zero, bits, group size), per-channel keys' block of each token (plain
PyTorch, importable without Triton)."""

from __future__ import annotations

import torch

from hf_subtok.quant import ChannelQuantizedTensor, CodedTensor, QuantizedTensor
from hf_subtok.quant.channel import BLOCK_INDEX_DTYPE


def allowed_bytes(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """`[B|1, 1, 1, T']` bool (True attends) or additive float (attends where above
    finfo.min / 2, as in the reference) -> `[B|1, T']` uint8, 1 where the key may be attended."""
    if attention_mask is None:
        return None
    mask = attention_mask.reshape(attention_mask.shape[0], attention_mask.shape[-1])  # [B|1, T']
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.to(torch.uint8).contiguous()


def storage_operands(x: torch.Tensor | QuantizedTensor | ChannelQuantizedTensor | CodedTensor):
    """`(data, scale, zero, bits, group_size)`: a plain tensor is its own (never read) scale and
    zero with bits 0; a quantized one gives its payload, scale and zero (equal strides); a
    per-channel one has one channel per group (its rows are picked by `block_index`); a coded
    one its payload, its scale twice (no zero) and its channels per codeword."""
    if isinstance(x, CodedTensor):
        return x.payload, x.scale, x.scale, x.bits, x.piece
    if isinstance(x, QuantizedTensor):
        return x.payload, x.scale, x.zero, x.bits, x.group_size
    if isinstance(x, ChannelQuantizedTensor):
        return x.payload, x.scale, x.zero, x.bits, 1
    return x, x, x, 0, 1


def block_index(x: torch.Tensor | QuantizedTensor | ChannelQuantizedTensor) -> torch.Tensor | None:
    """The `[B, Hkv, Ts]` int16 block of each token of per-channel keys (expanded from their
    runs for this call), else None."""
    return x.token_blocks().to(BLOCK_INDEX_DTYPE) if isinstance(x, ChannelQuantizedTensor) else None
