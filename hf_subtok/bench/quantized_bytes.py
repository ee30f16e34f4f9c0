"""Bytes a transformers `QuantizedCache` really holds, measured from its tensors.

A `QuantizedLayer` holds the quantized states of every token it has flushed in
`_quantized_keys` / `_quantized_values`, in a layout its backend chooses, plus a
full-precision residual window in `keys` / `values` (`[B, Hkv, R, D]`, R < residual_length).

- quanto: a `WeightQBitsTensor`, a tensor subclass whose inner tensors (found through the
  `__tensor_flatten__` protocol) are `_data` (a `PackedTensor` around `uint8` codes, 8/bits
  codes a byte), `_scale` and `_shift` (one each per group of `q_group_size`, model dtype).
- hqq: a tuple `(codes, meta)`: `uint8` packed codes and a dict whose tensors are `scale` and
  `zero` (one each per group, model dtype); the other entries are plain Python settings.

Nothing here assumes a layout: every tensor reachable from a layer's attributes (through
tensor subclasses, tuples, lists and dicts) is counted once per storage, at the storage's
size, and split into codes (integer or 1-byte float elements), metadata (the other floating
point tensors under the quantized states: scales, zero points) and the residual window.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

QUANTIZED_ATTRS = ("_quantized_keys", "_quantized_values")
RESIDUAL_ATTRS = ("keys", "values")


def leaf_tensors(obj) -> Iterator[torch.Tensor]:
    """Plain tensors reachable from `obj`: tensors, tensor subclasses, tuples, lists, dicts."""
    if torch.is_tensor(obj):
        flatten = getattr(type(obj), "__tensor_flatten__", None)
        if flatten is not None:  # a wrapper subclass (quanto): its data lives in inner tensors
            names, _ = obj.__tensor_flatten__()
            for name in names:
                yield from leaf_tensors(getattr(obj, name))
        else:
            yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from leaf_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from leaf_tensors(item)


def _storage_key(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    return (tensor.device.type, storage.data_ptr(), storage.nbytes())


def _is_code(tensor: torch.Tensor) -> bool:
    """Packed codes: integer elements (uint8 packing) or 1-byte floats (fp8)."""
    return not tensor.dtype.is_floating_point or tensor.element_size() == 1


def layer_bytes(layer) -> dict[str, int]:
    """`{"codes", "metadata", "residual", "other", "total"}` bytes one cache layer holds.

    `other` counts any tensor attribute outside the quantized states and the residual
    window (e.g. a pending beam index), so `total` is every byte the layer holds.
    """
    seen: set[tuple] = set()
    parts = {"codes": 0, "metadata": 0, "residual": 0, "other": 0}

    def add(part: str, obj) -> None:
        for tensor in leaf_tensors(obj):
            key = _storage_key(tensor)
            if key in seen:
                continue
            seen.add(key)
            nbytes = tensor.untyped_storage().nbytes()
            if part == "quantized":
                parts["codes" if _is_code(tensor) else "metadata"] += nbytes
            else:
                parts[part] += nbytes

    for name in QUANTIZED_ATTRS:
        add("quantized", getattr(layer, name, None))
    for name in RESIDUAL_ATTRS:
        add("residual", getattr(layer, name, None))
    for name, value in vars(layer).items():
        if name not in QUANTIZED_ATTRS + RESIDUAL_ATTRS:
            add("other", value)
    parts["total"] = sum(parts.values())
    return parts


def quantized_cache_bytes(cache) -> dict[str, int]:
    """`layer_bytes` summed over every layer of `cache`."""
    totals = {"codes": 0, "metadata": 0, "residual": 0, "other": 0, "total": 0}
    for layer in cache.layers:
        for part, nbytes in layer_bytes(layer).items():
            totals[part] += nbytes
    return totals


def residual_tokens(cache) -> int:
    """Tokens in the full-precision residual window of layer 0 (0 when all are quantized)."""
    keys = cache.layers[0].keys
    return int(keys.shape[-2]) if keys is not None and keys.dim() == 4 else 0
