"""The precision axis: stored keys and value groups in 8, 4 or 2 bits.

`quantize(x, bits, group_size)` turns a `[..., N]` tensor into a `QuantizedTensor` (uint8
payload with codes packed along the last dim, a scale and a zero per `group_size` channels of
each row). Rows (tokens) are independent, so the cache moves them with `QuantizedTensor.apply`
and `QuantizedTensor.cat` exactly as it moves plain tensors. Attention reads the quantized
storage directly (`hf_subtok.kernels.packed_attention`).

Keys are stored per channel instead (`quantize_channels` -> `ChannelQuantizedTensor`: a scale
and zero per channel and block of tokens, the tokens' blocks held as runs), which fits them
far better; see `quant.channel` (`extend_channels` grows the last block as tokens arrive). Below one bit per element, `quantize_vectors` -> `CodedTensor`
stores pieces of a few channels as indices into a fitted codebook (`quant.codebook`).
"""

from hf_subtok.quant.bits import SUPPORTED_BITS, pack_bits, unpack_bits
from hf_subtok.quant.channel import ChannelQuantizedTensor, extend_channels, quantize_channels
from hf_subtok.quant.codebook import CodedTensor, quantize_vectors
from hf_subtok.quant.reference import check_quantize_args, default_scale_dtype, quantize
from hf_subtok.quant.tensor import QuantizedTensor

__all__ = [
    "ChannelQuantizedTensor",
    "CodedTensor",
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "check_quantize_args",
    "default_scale_dtype",
    "extend_channels",
    "pack_bits",
    "quantize",
    "quantize_channels",
    "quantize_vectors",
    "unpack_bits",
]
