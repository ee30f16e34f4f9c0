"""Build one method's cache for one case, and measure what it holds."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from hf_subtok import SubTokenCache, SubTokenConfig
from hf_subtok.bench import kvpress_methods as kvp
from hf_subtok.bench import quantized_methods as quantized
from hf_subtok.bench.decoding import chunked_prefill
from hf_subtok.bench.methods import MethodSpec
from hf_subtok.bench.prefill import DensePrefill, attention_modules
from hf_subtok.scorers import Observation
from hf_subtok.views import PrefillKV

UNREACHABLE = "not reachable without token eviction"


class Unreachable(Exception):
    """The method cannot store this budget (e.g. subtok below its smallest ratio)."""


@dataclass
class Compressed:
    """A method's cache after the shared prefill, with what it holds.

    `stored_bytes` is measured from the tensors the cache holds; `dense_bytes` is what a
    `DynamicCache` holds for the same tokens; `info` carries method details for the report.
    `last_logits` `[1, V]`: the logits after the prompt when the method ran its own prefill
    through its cache (a chunked prefill attends to the compressed earlier chunks), else None.
    """

    cache: object
    stored_bytes: int
    dense_bytes: int
    seconds: float
    info: dict = field(default_factory=dict)
    last_logits: torch.Tensor | None = None

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.dense_bytes

    def logits_after(self, prefill: DensePrefill) -> torch.Tensor:
        """The logits `[1, V]` after the prompt this cache holds: its own, else the shared prefill's."""
        return prefill.last_logits if self.last_logits is None else self.last_logits


def subtok_config(budget: float | None, window: int | None, options: tuple = ()) -> SubTokenConfig:
    """The `SubTokenConfig` the benchmark uses for `subtok[options]@budget`.

    The bench's `window`, if set, is the base; `options` (a preset's fields, then `key=value`
    overrides, see `methods.MethodSpec`) replace it and any other field. Fields left unset
    come from the recipe table at the cache (`hf_subtok.recipes`), as for a user.
    """
    fields = {**({} if window is None else {"window": window}), **dict(options)}
    if budget is not None:
        fields["budget"] = budget
    return SubTokenConfig(**fields)


def check_subtok_reachable(model, budget: float | None, window: int | None, options: tuple = ()) -> str | None:
    """None if `subtok[options]@budget` can be built for `model`, else the reason it cannot."""
    try:
        SubTokenCache(model, subtok_config(budget, window, options))
    except ValueError as e:
        return f"{UNREACHABLE} ({e})"
    return None


@torch.no_grad()
def fill_from_prefill(cache: SubTokenCache, model, prefill: DensePrefill) -> SubTokenCache:
    """Fill an empty `cache` as a prefill through it would, from a shared dense prefill.

    Each layer gets the dense keys/values; a layer that selects tokens from the prompt's
    queries (it answers with a `PrefillKV`) is then handed the prefill's own last queries,
    exactly as hf-subtok's attention function does after the exact prefill attention.
    The result is bit-identical to a prefill through the cache (tests/test_bench.py).
    """
    if not prefill.queries:
        raise ValueError("fill_from_prefill needs a prefill with its last queries (not a truncated view)")
    modules = attention_modules(model)
    for layer_idx, (keys, values) in enumerate(zip(prefill.keys, prefill.values, strict=True)):
        view, _ = cache.update(keys, values, layer_idx)
        if isinstance(view, PrefillKV):
            queries = prefill.queries[layer_idx][:, :, -view.obs_window :]
            if queries.shape[2] < min(view.obs_window, prefill.length):
                raise ValueError(f"obs_window={view.obs_window} exceeds the {queries.shape[2]} queries kept")
            view.observer(Observation(queries, None, modules[layer_idx].scaling))
    return cache


@torch.no_grad()
def build_cache(
    spec: MethodSpec,
    model,
    prefill: DensePrefill,
    *,
    window: int | None,
    match_ratio: float | None = None,
    input_ids: torch.Tensor | None = None,
    hooked: bool = False,
) -> Compressed:
    """`spec`'s cache holding the compressed context of `prefill`.

    Args:
        match_ratio: for kvpress, the stored/dense ratio to match (`c = 1 - match_ratio`).
        input_ids: `[1, T]` the prefill's tokens, needed when `hooked` (kvpress's own prefill)
            and for subtok with `spec.prefill_chunk` (fed through the cache chunk by chunk).
        hooked: run kvpress's forward hooks on a fresh prefill instead of the shared one.

    Raises:
        Unreachable: subtok cannot store `spec.budget` with whole keys.
    """
    dense_bytes = prefill.dense_bytes
    if spec.prefill_chunk is not None and input_ids is None:
        raise ValueError(f"{spec.name} prefills in chunks: build_cache needs input_ids")
    if spec.family == "dense":
        start = time.perf_counter()
        last_logits = None
        if spec.prefill_chunk is None:
            cache = prefill.to_dynamic_cache()
        else:
            cache = DynamicCache()
            last_logits = chunked_prefill(model, cache, input_ids, spec.prefill_chunk)
        stored = sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))
        return Compressed(cache, stored, dense_bytes, time.perf_counter() - start, last_logits=last_logits)
    if spec.family == "subtok":
        start = time.perf_counter()
        try:
            cache = SubTokenCache(model, subtok_config(spec.budget, window, spec.options))
        except ValueError as e:  # the configuration cannot store this budget
            raise Unreachable(f"{UNREACHABLE} ({e})") from e
        last_logits = None
        if spec.prefill_chunk is None:
            fill_from_prefill(cache, model, prefill)
        else:
            last_logits = chunked_prefill(model, cache, input_ids, spec.prefill_chunk)
        seconds = time.perf_counter() - start
        report = cache.memory_report()
        info = {"keep_groups": report["keep_groups"], "num_groups": report["num_groups"], "window": cache.config.window}
        if spec.options:
            info["overrides"] = dict(spec.options)
        return Compressed(cache, report["stored_bytes"], report["dense_bytes"], seconds, info, last_logits)
    if spec.family == "quantized":
        cache, stored, seconds, info = quantized.build(model, prefill, spec.backend, spec.bits, dict(spec.options))
        return Compressed(cache, stored, dense_bytes, seconds, info)
    if spec.family == "kvpress":
        ratio = spec.budget if match_ratio is None else match_ratio
        compression_ratio = min(max(1.0 - ratio, 0.0), 0.99)
        press = kvp.make_press(spec.press, compression_ratio)
        kvp.clear_masks(model)
        if hooked:
            cache, seconds = kvp.compress_hooked(model, press, input_ids)
        else:
            cache, seconds = kvp.compress_shared(model, press, prefill)
        stored = kvp.press_cache_bytes(model, cache)
        masked = kvp.masked_fraction(model, cache)
        info = {
            "compression_ratio": round(compression_ratio, 6),
            "matched_ratio": ratio,
            "prefill": "own (kvpress hooks)" if hooked else "shared",
            "masked": masked is not None,
        }
        if masked is not None:
            info["effective_ratio"] = 1.0 - masked
        return Compressed(cache, stored, dense_bytes, seconds, info)
    raise ValueError(f"family must be one of dense, subtok, kvpress, quantized, got {spec.family!r}")


def release(model, compressed: Compressed | None) -> None:
    """Undo per-method state left on the model (AdaKV masks)."""
    if compressed is not None and compressed.info.get("masked"):
        kvp.clear_masks(model)
