"""kvpress presses, run through kvpress's own classes, at the same stored bytes as ours.

Two ways to get a press's compressed cache, which give the same tensors (checked once per
run by `verify_shared_path`):

- `compress_shared`: from a shared `DensePrefill`, call the press's own
  `compress(module, hidden_states, keys, values, attentions, kwargs)` per layer, exactly as
  its forward hook would after that layer's (exact) prefill attention.
- `compress_hooked`: kvpress's pipeline way, `with press(model): model.model(input_ids)`, one
  prefill per press.
"""

from __future__ import annotations

import importlib
import logging
import time
from contextlib import contextmanager

import torch
from transformers import DynamicCache

from hf_subtok.bench.methods import PRESSES
from hf_subtok.bench.prefill import DensePrefill, attention_modules, dynamic_cache_from
from hf_subtok.generate_args import cache_kwargs

logger = logging.getLogger(__name__)

MATCHING = (
    "kvpress presses evict whole tokens, so a press at compression_ratio c stores (1 - c) of the "
    "dense bytes. Each press runs at c = 1 - r, where r is the stored/dense ratio measured from "
    "the tensors of subtok at the same target budget on the same case (same context); where subtok "
    "cannot reach the budget, r is the target budget itself. Stored bytes of every row are then "
    "measured from the tensors the cache holds after compression."
)
MASKING_NOTE = (
    "AdaKVPress does not shrink the cache: it keeps every key and value and masks evicted "
    "(head, token) pairs during attention, so its measured stored bytes are the dense bytes plus "
    "its mask indices; the plot places it at its nominal kept fraction (hollow marker)."
)


def import_kvpress():
    """Import kvpress, undoing its wrap of hf-subtok's attention function (`register_attention`).

    kvpress wraps every registered attention function on import (for AdaKV's masks); the
    wrapper reads `key.shape`, which the `PackedKV` hf-subtok hands its own function lacks.
    Dense calls inside hf-subtok's function still go through the wrapped `sdpa`.
    """
    kvpress = importlib.import_module("kvpress")
    from hf_subtok.attention import register_attention

    register_attention()
    return kvpress


def kvpress_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("kvpress")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return None


def make_press(key: str, compression_ratio: float):
    """A kvpress press object for `PRESSES[key]` at `compression_ratio`."""
    kvpress = import_kvpress()
    cls_name, inner_name = PRESSES[key]
    if inner_name is not None:
        inner = getattr(kvpress, inner_name)(compression_ratio=compression_ratio)
        return getattr(kvpress, cls_name)(press=inner)
    return getattr(kvpress, cls_name)(compression_ratio=compression_ratio)


def is_masking(key: str) -> bool:
    """Whether the press masks evicted pairs instead of removing them (AdaKV)."""
    return PRESSES[key][0] == "AdaKVPress"


@contextmanager
def _rotary_attached(model):
    """Give each attention module `rotary_emb`, as a press's `__call__` does; undo afterwards."""
    modules = attention_modules(model)
    base = model.model.language_model if hasattr(model.model, "language_model") else model.model
    added = [m for m in modules if not hasattr(m, "rotary_emb")]
    for m in added:
        m.rotary_emb = base.rotary_emb
    try:
        yield modules
    finally:
        for m in added:
            del m.rotary_emb


def clear_masks(model) -> None:
    """Forget AdaKV's masked indices so the next method attends normally."""
    for module in attention_modules(model):
        if getattr(module, "masked_key_indices", None) is not None:
            module.masked_key_indices = None


@torch.no_grad()
def compress_shared(model, press, prefill: DensePrefill) -> tuple[DynamicCache, float]:
    """The press's compressed cache from a shared prefill (with hidden states); and seconds."""
    if prefill.hidden is None:
        raise ValueError("compress_shared needs a prefill captured with capture_hidden=True")
    start = time.perf_counter()
    press.post_init_from_model(model)
    length = prefill.length
    device = prefill.keys[0].device
    positions = torch.arange(length, device=device)
    keys, values = [], []
    with _rotary_attached(model) as modules:
        for module, hidden, k, v in zip(modules, prefill.hidden, prefill.keys, prefill.values, strict=True):
            kwargs = {
                "hidden_states": hidden,
                "position_embeddings": prefill.position_embeddings,
                "attention_mask": None,
                "cache_position": positions,
                "position_ids": positions.unsqueeze(0),
            }
            ck, cv = press.compress(module, hidden, k, v, None, kwargs)
            keys.append(ck)
            values.append(cv)
    cache = dynamic_cache_from(keys, values)
    return cache, time.perf_counter() - start


@torch.no_grad()
def compress_hooked(model, press, input_ids: torch.Tensor) -> tuple[DynamicCache, float]:
    """kvpress's own way: a prefill of `input_ids` `[1, T]` under `with press(model)`."""
    cache = DynamicCache()
    start = time.perf_counter()
    with press(model):
        model.model(input_ids=input_ids, **cache_kwargs(cache), use_cache=True)
    return cache, time.perf_counter() - start


def press_cache_bytes(model, cache: DynamicCache) -> int:
    """Bytes held for the compressed context: cache tensors plus any AdaKV mask indices."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.untyped_storage().nbytes()
    for module in attention_modules(model):
        masked = getattr(module, "masked_key_indices", None)
        if masked is not None:
            total += sum(t.untyped_storage().nbytes() for t in masked)
    return total


def masked_fraction(model, cache: DynamicCache) -> float | None:
    """Fraction of (layer, head, token) pairs AdaKV masks, or None without masks."""
    masked = pairs = 0
    found = False
    for module, layer in zip(attention_modules(model), cache.layers, strict=True):
        batch, heads, tokens, _ = layer.keys.shape
        pairs += batch * heads * tokens
        indices = getattr(module, "masked_key_indices", None)
        if indices is not None:
            found = True
            masked += indices[0].numel()
    return masked / pairs if found and pairs else None


@torch.no_grad()
def verify_shared_path(model, press_keys: list[str], compression_ratio: float, input_ids, prefill: DensePrefill) -> dict:
    """Compare `compress_shared` with kvpress's hooked prefill on one context, per press.

    `prefill` must be the (possibly truncated) shared prefill of exactly `input_ids`.
    Returns `{press: {"identical": bool, "max_abs_diff": float}}`; identical means the same
    shapes, the same AdaKV masks, and bit-identical keys and values.
    """
    report = {}
    for key in press_keys:
        press = make_press(key, compression_ratio)
        ours, _ = compress_shared(model, press, prefill)
        our_masks = [getattr(m, "masked_key_indices", None) for m in attention_modules(model)]
        clear_masks(model)
        theirs, _ = compress_hooked(model, press, input_ids)
        their_masks = [getattr(m, "masked_key_indices", None) for m in attention_modules(model)]
        clear_masks(model)
        identical, diff = True, 0.0
        for a, b in zip(ours.layers, theirs.layers, strict=True):
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                if x.shape != y.shape:
                    identical, diff = False, float("inf")
                    break
                diff = max(diff, float((x - y).abs().max()))
        for a, b in zip(our_masks, their_masks, strict=True):
            if (a is None) != (b is None) or (a is not None and not all(torch.equal(x, y) for x, y in zip(a, b, strict=True))):
                identical = False
        identical = identical and diff == 0.0
        report[key] = {"identical": identical, "max_abs_diff": diff}
        level = logging.INFO if identical else logging.WARNING
        logger.log(level, "shared-prefill path for %s: %s (max |diff| %.2e)", key,
                   "bit-identical to kvpress's own hooks" if identical else "DIFFERS, using one prefill per press", diff)
    return report
