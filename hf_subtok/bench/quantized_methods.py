"""transformers' own `QuantizedCache` (quanto and hqq backends) as benchmark rows.

How the prompt gets into the cache. A `QuantizedLayer`'s first `update` quantizes every
token it is given and returns them unchanged, so the prefill attends to exact keys and
values, exactly as with a `DynamicCache`; the residual window (`residual_length`, default
128) only collects tokens added later, and once it is full the whole cache is dequantized,
joined and quantized again. So the dense keys and values of the shared prefill, fed through
`update` layer by layer, leave the same quantized tensors as a prefill through the cache
(tests/test_bench_quantized.py checks they are bit-identical), and every evaluation after it
(the next answer token, the withheld question, the perplexity tokens) reads the whole
prompt dequantized: after `fill_from_prefill` no prompt token is left in full precision.

Backends are optional packages (`pip install hf-subtok[quant]`); `backend_problem` says in
one line why one cannot run here, and such a backend is skipped.
"""

from __future__ import annotations

import importlib
import time
from typing import NamedTuple

import torch

from hf_subtok.bench.prefill import DensePrefill
from hf_subtok.bench.quantized_bytes import quantized_cache_bytes, residual_tokens


class Backend(NamedTuple):
    module: str  # what must import
    package: str  # what pip installs
    bits: tuple[int, ...]  # widths transformers accepts for it


BACKENDS: dict[str, Backend] = {
    "quanto": Backend("optimum.quanto", "optimum-quanto", (2, 4)),
    "hqq": Backend("hqq", "hqq", (1, 2, 3, 4, 8)),
}
DEFAULT_BITS = (4, 2)
# QuantizedCache arguments a method item may set, e.g. quantized:quanto+residual_length=32@4
OPTIONS = ("axis_key", "axis_value", "q_group_size", "residual_length")
QUANTIZED_NOTE = (
    "quantized[BACKEND]@Nbit rows are transformers' own QuantizedCache (its defaults unless the row "
    "says otherwise: q_group_size 64, residual_length 128, axis 0). The shared dense prefill's keys and "
    "values are fed through its update, which quantizes every prompt token, bit-identically to a "
    "prefill through the cache; later tokens wait in its full-precision residual window. Stored bytes "
    "are the packed codes, scales, zero points and residual window, measured from the tensors it holds."
)


def backend_version(backend: str) -> str | None:
    """Installed version of the backend's package, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(BACKENDS[backend].package)
    except PackageNotFoundError:
        return None


def backend_problem(backend: str, bits: int = 4) -> str | None:
    """None if `backend` quantizes here, else a one-line reason (import or run failure).

    Runs a tiny quantize/dequantize round trip through transformers' own layer class.
    """
    module = BACKENDS[backend].module
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "cannot run here"
        return f"{module} cannot be imported ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        layer = _layer_class(backend)(nbits=bits, q_group_size=16, residual_length=4)
        keys = torch.linspace(-1, 1, 2 * 3 * 16).reshape(1, 2, 3, 16)
        layer.update(keys, keys)
        restored = layer._dequantize(layer._quantized_keys)
        if restored.shape != keys.shape or not torch.isfinite(restored).all():
            return f"{backend} round trip returned a wrong tensor ({tuple(restored.shape)})"
    except Exception as e:  # noqa: BLE001 - a backend that fails here is skipped, not fatal
        return f"{backend} fails on this machine ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    return None


def check_settings(backend: str, bits: int, options: dict) -> None:
    """Raise `ValueError` naming the value if transformers rejects these settings."""
    if backend not in BACKENDS:
        raise ValueError(f"quantized backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    allowed = BACKENDS[backend].bits
    if bits not in allowed:
        raise ValueError(f"quantized bits for {backend} must be one of {allowed}, got {bits}")
    for name, value in options.items():
        if name not in OPTIONS:
            raise ValueError(f"quantized option must be one of {', '.join(OPTIONS)}, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"quantized option {name} must be an integer, got {value!r}")
    if options.get("q_group_size", 1) < 1:
        raise ValueError(f"quantized option q_group_size must be >= 1, got {options['q_group_size']}")
    if options.get("residual_length", 1) < 1:
        raise ValueError(f"quantized option residual_length must be >= 1, got {options['residual_length']}")


def make_cache(model, backend: str, bits: int, options: dict):
    """An empty `QuantizedCache(backend, model.config, nbits=bits, **options)`."""
    from transformers import QuantizedCache

    return QuantizedCache(backend=backend, config=model.config, nbits=bits, **options)


@torch.no_grad()
def fill_from_prefill(cache, prefill: DensePrefill):
    """Feed the shared prefill's per-layer `[B, Hkv, T, D]` keys and values through `update`."""
    for layer_idx, (keys, values) in enumerate(zip(prefill.keys, prefill.values, strict=True)):
        cache.update(keys, values, layer_idx)
    return cache


def settings(cache) -> dict:
    """The quantization settings layer 0 runs with (transformers' defaults filled in)."""
    layer = cache.layers[0]
    return {name: getattr(layer, name) for name in ("nbits", "q_group_size", "residual_length", "axis_key", "axis_value")}


def build(model, prefill: DensePrefill, backend: str, bits: int, options: dict) -> tuple[object, int, float, dict]:
    """The prompt's `QuantizedCache`: `(cache, stored_bytes, seconds, info)`.

    `stored_bytes` is measured from the tensors the cache holds (`quantized_cache_bytes`).
    """
    start = time.perf_counter()
    cache = fill_from_prefill(make_cache(model, backend, bits, options), prefill)
    seconds = time.perf_counter() - start
    held = quantized_cache_bytes(cache)
    info = {
        "backend": backend,
        "backend_version": backend_version(backend),
        **settings(cache),
        "code_bytes": held["codes"],
        "metadata_bytes": held["metadata"],
        "residual_bytes": held["residual"],
        "quantized_tokens": prefill.length - residual_tokens(cache),
        "residual_tokens": residual_tokens(cache),
    }
    return cache, held["total"], seconds, info


def _layer_class(backend: str):
    from transformers import cache_utils

    return {"quanto": cache_utils.QuantoQuantizedLayer, "hqq": cache_utils.HQQQuantizedLayer}[backend]
