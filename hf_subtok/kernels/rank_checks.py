"""Input checks of the rank-attention kernels (`hf_subtok.kernels.rank_attention`): every path
shares them, and they run before any launch. Nothing here imports `triton`."""

from __future__ import annotations

import torch

from hf_subtok.kernels._dispatch import check_attention_mask, check_stored_valid
from hf_subtok.quant import QuantizedTensor
from hf_subtok.views import RankKV

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_RANK_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def check_rank_attention_inputs(query: torch.Tensor, kv: RankKV, attention_mask: torch.Tensor | None) -> None:
    """Raise `ValueError` (`TypeError` for a wrong kind) naming the argument and the value
    unless the inputs fit together (shapes in `RankKV`'s docstring)."""
    if not isinstance(kv, RankKV):
        raise TypeError(f"kv must be a RankKV, got {type(kv).__name__}")
    if not isinstance(query, torch.Tensor) or query.dim() != 4:
        raise ValueError(f"query must be [B, Hq, Q, D], got {_shape(query)}")
    if query.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"query dtype must be one of {_FLOAT_DTYPES}, got {query.dtype}")
    batch, q_heads, _, head_dim = query.shape
    for name in ("tail_keys", "tail_values"):
        tensor = getattr(kv, name)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or tensor.shape[0] != batch or tensor.shape[-1] != head_dim:
            raise ValueError(f"kv.{name} must be [B={batch}, Hkv, Tt, D={head_dim}], got {_shape(tensor)}")
        if tensor.dtype != query.dtype:
            raise ValueError(f"kv.{name} dtype must match query dtype {query.dtype}, got {tensor.dtype}")
    kv_heads, tail = kv.tail_keys.shape[1], kv.tail_keys.shape[2]
    if kv.tail_values.shape != kv.tail_keys.shape:
        raise ValueError(f"kv.tail_values must be {tuple(kv.tail_keys.shape)} like kv.tail_keys, got {tuple(kv.tail_values.shape)}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of kv.tail_keys heads ({kv_heads})")
    stored = None
    for part in ("key", "value"):
        coeffs = getattr(kv, f"{part}_coeffs")
        if isinstance(coeffs, QuantizedTensor):
            try:
                coeffs.validate()
            except ValueError as error:
                raise ValueError(f"kv.{part}_coeffs: {error}") from None
        elif not isinstance(coeffs, torch.Tensor) or not coeffs.is_floating_point():
            raise TypeError(f"kv.{part}_coeffs must be a float torch.Tensor or a QuantizedTensor, got {_kind(coeffs)}")
        stored = coeffs.shape[2] if stored is None and coeffs.dim() == 4 else stored
        if coeffs.dim() != 4 or tuple(coeffs.shape[:3]) != (batch, kv_heads, stored) or not 1 <= coeffs.shape[3] <= head_dim:
            raise ValueError(
                f"kv.{part}_coeffs must be [B={batch}, Hkv={kv_heads}, Ts, R in 1..D={head_dim}] (Ts equal for keys "
                f"and values), got {_shape(coeffs)}"
            )
        width = coeffs.shape[3]
        rank = getattr(kv, f"{part}_rank")
        if not isinstance(rank, torch.Tensor) or rank.dtype not in _RANK_DTYPES or tuple(rank.shape) != (batch, kv_heads, stored):
            raise ValueError(
                f"kv.{part}_rank must be an integer tensor ({', '.join(map(str, _RANK_DTYPES))}) "
                f"[B={batch}, Hkv={kv_heads}, Ts={stored}], got {_kind(rank)} {_shape(rank)}"
            )
        basis = getattr(kv, f"{part}_basis")
        if not isinstance(basis, torch.Tensor) or not basis.is_floating_point() or tuple(basis.shape) != (kv_heads, head_dim, width):
            raise ValueError(
                f"kv.{part}_basis must be a float [Hkv={kv_heads}, D={head_dim}, R={width}] tensor (the first R "
                f"columns of the basis), got {_kind(basis)} {_shape(basis)}"
            )
        mean = getattr(kv, f"{part}_mean")
        if mean is not None and (
            not isinstance(mean, torch.Tensor) or not mean.is_floating_point() or tuple(mean.shape) != (kv_heads, head_dim)
        ):
            raise ValueError(f"kv.{part}_mean must be None or a float [Hkv={kv_heads}, D={head_dim}] tensor, got {_shape(mean)}")
        for name, tensor in ((f"{part}_coeffs", coeffs), (f"{part}_rank", rank), (f"{part}_basis", basis), (f"{part}_mean", mean)):
            if tensor is not None and tensor.device != query.device:
                raise ValueError(f"kv.{name} is on {tensor.device}, query on {query.device}")
    for name in ("tail_keys", "tail_values"):
        if getattr(kv, name).device != query.device:
            raise ValueError(f"kv.{name} is on {getattr(kv, name).device}, query on {query.device}")
    if stored + tail == 0:
        raise ValueError("kv holds no tokens (Ts = Tt = 0)")
    check_stored_valid(kv.stored_valid, (batch, kv_heads, stored), query.device)
    check_attention_mask(attention_mask, query, stored, tail, per_head=kv.stored_valid is not None)


def _shape(x) -> str:
    return str(tuple(x.shape)) if hasattr(x, "shape") else type(x).__name__


def _kind(x) -> str:
    return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
