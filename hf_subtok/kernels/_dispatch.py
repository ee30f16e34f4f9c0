"""Which path computes a kernel, and the input checks every path shares.

Nothing here imports `triton`: the Triton modules are imported only once a call has chosen
them, so `import hf_subtok` never pulls Triton in (and never fixes `TRITON_INTERPRET` early).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from hf_subtok.quant import ChannelQuantizedTensor, CodedTensor, QuantizedTensor
from hf_subtok.quant.pre_rope_keys import PreRopeKeys
from hf_subtok.quant.tensor import PackedCodes
from hf_subtok.views import PackedKV

BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_GRID_Y = 65535  # a CUDA grid's second and third axes (the first takes 2**31 - 1)


def triton_available() -> bool:
    """True when the `triton` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(backend: str, device: torch.device) -> bool:
    """Decide the path: "torch" never, "auto" for CUDA tensors when Triton is installed,
    "triton" always (CPU tensors then need `TRITON_INTERPRET=1`, set before Triton is imported).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise ImportError("backend='triton' needs the triton package: pip install 'hf-subtok[triton]'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' got tensors on {device}; Triton runs on CUDA devices, or on the CPU "
            "when TRITON_INTERPRET=1 is set before triton is first imported"
        )
    return True


def records_grad(*parts: torch.Tensor | PackedCodes | None) -> bool:
    """Whether autograd records an op on `parts` (plain or quantized tensors, None skipped):
    grad mode is on and one of them requires grad. The CPU path then builds fresh tensors where
    it otherwise writes into reused buffers and `out=` arguments (autograd refuses `out=` and
    keeps what it saves for the backward pass); with grad off, only `torch.is_grad_enabled()`
    is read."""
    if not torch.is_grad_enabled():
        return False
    for part in parts:
        if isinstance(part, PackedCodes):
            if any(t.requires_grad for t in part.tensors().values()):
                return True
        elif part is not None and part.requires_grad:
            return True
    return False


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` current while a kernel launches: Triton launches on the current CUDA
    device and its stream, which under `device_map="auto"` need not hold the tensors."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_packed_attention_inputs(
    query: torch.Tensor, kv: PackedKV, attention_mask: torch.Tensor | None
) -> None:
    """Raise `ValueError` naming the argument and the value unless the inputs fit together."""
    if not isinstance(kv, PackedKV):
        raise TypeError(f"kv must be a PackedKV, got {type(kv).__name__}")
    _check_kinds(kv)
    if query.dim() != 4:
        raise ValueError(f"query must be [B, Hq, Q, D], got shape {tuple(query.shape)}")
    batch, q_heads, _, head_dim = query.shape
    for name in ("keys", "tail_keys", "tail_values"):
        tensor = getattr(kv, name)
        if tensor.dim() != 4 or tensor.shape[0] != batch or tensor.shape[-1] != head_dim:
            raise ValueError(f"kv.{name} must be [B={batch}, Hkv, T, D={head_dim}], got {tuple(tensor.shape)}")
    kv_heads, rows, stored = kv.tail_keys.shape[1], kv.keys.shape[1], kv.keys.shape[2]
    tail = kv.tail_keys.shape[2]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of kv.tail_keys heads ({kv_heads})")
    if rows not in (kv_heads, 1) or kv.tail_values.shape[:3] != kv.tail_keys.shape[:3]:
        raise ValueError(
            f"kv.keys {tuple(kv.keys.shape)}, kv.tail_keys {tuple(kv.tail_keys.shape)} and kv.tail_values "
            f"{tuple(kv.tail_values.shape)} must be [B, Hkv={kv_heads} (or 1: shared rows), Ts, D], "
            f"[B, Hkv, Tt, D] and [B, Hkv, Tt, D]"
        )
    if kv.shares_rows and kv.stored_valid is None:
        raise ValueError(
            "kv.keys share one row across KV heads ([B, 1, Ts, D]); kv.stored_valid [B, Hkv, Ts] must say "
            "which tokens each head owns"
        )
    groups = kv.num_groups
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= 256 or head_dim % groups:
        raise ValueError(f"kv.num_groups must be an int in 1..256 dividing D={head_dim}, got {groups!r}")
    width = head_dim // groups
    if kv.values.dim() != 5:
        raise ValueError(f"kv.values must be [B, Hkv, K, Ts, C], got shape {tuple(kv.values.shape)}")
    keep = kv.values.shape[2]
    if kv.values.shape != (batch, rows, keep, stored, width) or not 1 <= keep <= groups:
        raise ValueError(
            f"kv.values must be [B={batch}, Hkv={rows}, K in 1..{groups}, Ts={stored}, C={width}], "
            f"got {tuple(kv.values.shape)}"
        )
    if kv.group_idx.dtype != torch.uint8:
        raise ValueError(f"kv.group_idx must be torch.uint8, got {kv.group_idx.dtype}")
    if tuple(kv.group_idx.shape) != (batch, rows, keep, stored):
        raise ValueError(
            f"kv.group_idx must be [B={batch}, Hkv={rows}, K={keep}, Ts={stored}], got {tuple(kv.group_idx.shape)}"
        )
    _check_wide(kv, (batch, rows, groups - keep, stored, width), query.device)
    if stored + tail == 0:
        raise ValueError("kv holds no tokens (Ts = Tt = 0)")
    if query.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"query dtype must be one of {_FLOAT_DTYPES}, got {query.dtype}")
    for name in ("keys", "values", "tail_keys", "tail_values"):
        tensor = getattr(kv, name)
        if isinstance(tensor, PackedCodes):  # read in float32
            continue
        if tensor.dtype != query.dtype:
            raise ValueError(f"kv.{name} dtype must match query dtype {query.dtype}, got {tensor.dtype}")
    for name in ("keys", "values", "group_idx", "tail_keys", "tail_values"):
        tensor = getattr(kv, name)
        if tensor.device != query.device:
            raise ValueError(f"kv.{name} is on {tensor.device}, query on {query.device}")
    check_stored_valid(kv.stored_valid, (batch, kv_heads, stored), query.device)
    check_attention_mask(attention_mask, query, stored, tail, per_head=kv.stored_valid is not None)


def check_stored_valid(valid: torch.Tensor | None, shape: tuple[int, int, int], device: torch.device) -> None:
    """`kv.stored_valid` is None or a bool `[B, Hkv, Ts]` (`shape`) on the query's device."""
    if valid is None:
        return
    if valid.dtype != torch.bool or tuple(valid.shape) != shape:
        batch, kv_heads, stored = shape
        raise ValueError(
            f"kv.stored_valid must be bool [B={batch}, Hkv={kv_heads}, Ts={stored}], "
            f"got {valid.dtype} {tuple(valid.shape)}"
        )
    if valid.device != device:
        raise ValueError(f"kv.stored_valid is on {valid.device}, query on {device}")


def check_attention_mask(
    attention_mask: torch.Tensor | None, query: torch.Tensor, stored: int, tail: int, per_head: bool
) -> None:
    """`attention_mask` is None or `[B|1, 1, Q, T]` bool/float on the query's device, `T = Ts + Tt`
    (`per_head`, tokens selected per head: at least the Tt tail columns)."""
    if attention_mask is None:
        return
    batch, q_len, total = query.shape[0], query.shape[2], stored + tail
    # with per-head token selection the mask only has to cover the tail (its last columns)
    columns_ok = attention_mask.shape[-1] >= tail if per_head else attention_mask.shape[-1] == total
    if (
        attention_mask.dim() != 4
        or attention_mask.shape[0] not in (1, batch)
        or attention_mask.shape[1] != 1
        or attention_mask.shape[2] != q_len
        or not columns_ok
    ):
        want = f"T' >= Tt={tail}" if per_head else f"T={total}"
        raise ValueError(f"attention_mask must be [B or 1, 1, Q={q_len}, {want}], got {tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
        raise ValueError(f"attention_mask must be bool or float, got {attention_mask.dtype}")
    if attention_mask.device != query.device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, query on {query.device}")


def _check_wide(kv: PackedKV, most: tuple[int, int, int, int, int], device: torch.device) -> None:
    """`kv.wide_values` `[B, Hkv, G-K, W, C]` (W <= Ts) and uint8 `kv.wide_group_idx`
    `[B, Hkv, G-K, W]` come together, on the query's device; `most` is `(B, Hkv, G-K, Ts, C)`."""
    values, group_idx = kv.wide_values, kv.wide_group_idx
    if values is None and group_idx is None:
        return
    if values is None or group_idx is None:
        raise ValueError("kv.wide_values and kv.wide_group_idx must be given together")
    if not isinstance(values, (torch.Tensor, QuantizedTensor)) or not isinstance(group_idx, torch.Tensor):
        raise TypeError(
            f"kv.wide_values must be a torch.Tensor or QuantizedTensor and kv.wide_group_idx a torch.Tensor, "
            f"got {type(values).__name__} and {type(group_idx).__name__}"
        )
    batch, heads, others, stored, width = most
    shape = tuple(values.shape)
    if len(shape) != 5 or shape[:3] != (batch, heads, others) or shape[3] > stored or shape[4] != width:
        raise ValueError(
            f"kv.wide_values must be [B={batch}, Hkv={heads}, G-K={others}, W <= Ts={stored}, C={width}], got {shape}"
        )
    if group_idx.dtype != torch.uint8 or tuple(group_idx.shape) != shape[:4]:
        raise ValueError(
            f"kv.wide_group_idx must be uint8 {shape[:4]}, got {group_idx.dtype} {tuple(group_idx.shape)}"
        )
    if isinstance(values, QuantizedTensor):
        try:
            values.validate()
        except ValueError as error:
            raise ValueError(f"kv.wide_values: {error}") from None
    for name, tensor in (("wide_values", values), ("wide_group_idx", group_idx)):
        if tensor.device != device:
            raise ValueError(f"kv.{name} is on {tensor.device}, query on {device}")


def _check_kinds(kv: PackedKV) -> None:
    """Keys and values are tensors or `QuantizedTensor`s, keys also `ChannelQuantizedTensor`s
    or `PreRopeKeys`, values also `CodedTensor`s (validated again: kernels read their raw bytes), everything
    else a tensor."""
    for name in ("keys", "values", "group_idx", "tail_keys", "tail_values"):
        tensor = getattr(kv, name)
        quantized = (QuantizedTensor, ChannelQuantizedTensor, PreRopeKeys) if name == "keys" else (QuantizedTensor, CodedTensor)
        if isinstance(tensor, quantized) and name in ("keys", "values"):
            try:
                tensor.validate()
            except ValueError as error:
                raise ValueError(f"kv.{name}: {error}") from None
        elif not isinstance(tensor, torch.Tensor):
            kinds = {
                "keys": "a torch.Tensor, QuantizedTensor, ChannelQuantizedTensor or PreRopeKeys",
                "values": "a torch.Tensor, QuantizedTensor or CodedTensor",
            }.get(name, "a torch.Tensor")
            raise TypeError(f"kv.{name} must be {kinds}, got {type(tensor).__name__}")


def check_strides_for_triton(
    named: dict[str, torch.Tensor | QuantizedTensor | ChannelQuantizedTensor | CodedTensor],
) -> None:
    """The Triton kernels take any batch/head/token strides but need the last dim contiguous;
    a quantized tensor's scale and zero must share their strides. A `ChannelQuantizedTensor`'s
    block runs are not read by the kernels (they get each token's block, expanded)."""
    flat = {}
    for name, tensor in named.items():
        if not isinstance(tensor, (QuantizedTensor, ChannelQuantizedTensor, CodedTensor)):
            flat[name] = tensor
            continue
        if not isinstance(tensor, CodedTensor) and tensor.scale.stride() != tensor.zero.stride():
            raise ValueError(
                f"{name}.scale and {name}.zero must have equal strides for the Triton path, "
                f"got {tensor.scale.stride()} and {tensor.zero.stride()}"
            )
        flat.update({f"{name}.{part}": t for part, t in tensor.tensors().items() if not part.startswith("run_")})
    for name, tensor in flat.items():
        if tensor.numel() and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
            raise ValueError(
                f"{name} must be contiguous in its last dim for the Triton path, got strides {tensor.stride()}"
            )


def check_pack_inputs(values: torch.Tensor, scores: torch.Tensor, keep_groups: int) -> None:
    """Raise `ValueError` naming the argument and the value unless packing inputs fit together."""
    if values.dim() != 4:
        raise ValueError(f"values must be [B, Hkv, T, D], got shape {tuple(values.shape)}")
    if scores.dim() != 4 or scores.shape[:3] != values.shape[:3]:
        raise ValueError(
            f"scores must be [B, Hkv, T, G] matching values {tuple(values.shape)}, got {tuple(scores.shape)}"
        )
    groups, head_dim = scores.shape[-1], values.shape[-1]
    if not 1 <= groups <= 256 or head_dim % groups:
        raise ValueError(f"scores' group count G must be in 1..256 and divide D={head_dim}, got {groups}")
    if isinstance(keep_groups, bool) or not isinstance(keep_groups, int) or not 1 <= keep_groups <= groups:
        raise ValueError(f"keep_groups must be an int in 1..{groups}, got {keep_groups!r}")
    if not values.is_floating_point():
        raise ValueError(f"values must be floating point, got {values.dtype}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    if scores.device != values.device:
        raise ValueError(f"scores are on {scores.device}, values on {values.device}")
