"""`speed` suite: prefill seconds, decode tokens/s, peak RSS and stored bytes per context length.

Unlike the quality suites, every method runs its own prefill here (that cost is what is
measured): dense with a `DynamicCache`, subtok through `SubTokenCache`, quantized through
transformers' `QuantizedCache`, and each press under its own `with press(model)` hooks.
Decoding then produces exactly `speed_new_tokens` greedy tokens. Speed hardly depends on the
budget, so each method runs at its largest budget (or bit width) only.

When the model is loaded by name, each (length, method) runs in a fresh spawned process, so
its RSS (sampled during prefill and decode, model weights included) is that method's alone; with a model
object passed in (tests), it runs in this process and RSS is sampled around it.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from transformers import DynamicCache

from hf_subtok import SubTokenCache
from hf_subtok.bench import kvpress_methods as kvp
from hf_subtok.bench import quantized_methods as quantized
from hf_subtok.bench.apply import subtok_config
from hf_subtok.bench.decoding import greedy_continue
from hf_subtok.bench.evaluate import method_fields
from hf_subtok.bench.memory import PeakRSS
from hf_subtok.bench.methods import MethodSpec
from hf_subtok.bench.quantized_bytes import quantized_cache_bytes
from hf_subtok.bench.resume import skip_finished
from hf_subtok.generate_args import cache_kwargs
from hf_subtok.tasks import as_input_ids, build_needle_case


def speed_methods(config, methods):
    """Each method label once, at its first (largest) budget: speed hardly depends on it."""
    chosen: dict[str, MethodSpec] = {}
    for spec in methods:
        chosen.setdefault(spec.label, spec)
    return list(chosen.values())


def units(config, methods) -> int:
    return len(config.speed_lengths) * len(speed_methods(config, methods))


@torch.no_grad()
def _prefill(model, spec, ids, match, window):
    """Prefill `ids` `[1, T]` the method's own way; returns (cache, logits, seconds, info)."""
    info = {}
    if spec.family == "dense":
        cache = DynamicCache()
    elif spec.family == "subtok":
        cache = SubTokenCache(model, subtok_config(spec.budget, window, spec.options))
    elif spec.family == "quantized":
        cache = quantized.make_cache(model, spec.backend, spec.bits, dict(spec.options))
    else:
        ratio = spec.budget if match is None else match
        compression_ratio = min(max(1.0 - ratio, 0.0), 0.99)
        press = kvp.make_press(spec.press, compression_ratio)
        info = {"compression_ratio": round(compression_ratio, 6), "prefill": "own (kvpress hooks)"}
        cache = DynamicCache()
        start = time.perf_counter()
        with press(model):
            out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        return cache, out.logits[:, -1], time.perf_counter() - start, info
    start = time.perf_counter()
    out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1], time.perf_counter() - start, info


def _stored(model, spec, cache) -> int:
    if spec.family == "subtok":
        return cache.memory_report()["stored_bytes"]
    if spec.family == "kvpress":
        return kvp.press_cache_bytes(model, cache)
    if spec.family == "quantized":
        return quantized_cache_bytes(cache)["total"]
    return sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def measure(model, spec: MethodSpec, ids: torch.Tensor, match: float | None, window: int, new_tokens: int) -> dict:
    """Prefill `ids` `[1, T]` the method's own way, then decode `new_tokens` greedy tokens."""
    try:
        cache, logits, prefill_s, info = _prefill(model, spec, ids, match, window)
        stored = _stored(model, spec, cache)
        gen = greedy_continue(model, cache, ids.shape[1], first_logits=logits, max_new_tokens=new_tokens)
    finally:
        if spec.family == "kvpress":
            kvp.clear_masks(model)
    dense = _dense_bytes(model, ids.shape[1])
    return dict(prefill_s=prefill_s, decode_tokens=len(gen.token_ids), decode_s=gen.seconds,
                decode_tok_s=gen.tokens_per_second, stored_bytes=stored, dense_bytes=dense,
                ratio=stored / dense, **info)


def _worker(
    model_name, spec: MethodSpec, ids: list[int], match, window: int, new_tokens: int, threads: int, dtype: str
) -> dict:
    """`measure` in a fresh process, so its peak RSS is this method's alone."""
    torch.set_num_threads(threads)
    if spec.family == "kvpress":
        kvp.import_kvpress()
    from hf_subtok.model_loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_name, dtype=getattr(torch, dtype))
    with torch.no_grad():  # page the (memory-mapped) weights in before measuring
        model(input_ids=torch.tensor([ids[:8]]), use_cache=False, logits_to_keep=1)
    with PeakRSS() as peak:
        result = measure(model, spec, torch.tensor([ids]), match, window, new_tokens)
    result.update(peak_rss_mb=peak.peak_mb, rss_before_mb=peak.start_mb,
                  rss_scope="a fresh process per method, sampled during prefill and decode (weights included)")
    return result


def _run_isolated(ctx, spec, ids, match) -> dict:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        future = pool.submit(
            _worker, ctx.config.model, spec, ids[0].tolist(), match, ctx.config.window,
            ctx.config.speed_new_tokens, torch.get_num_threads(), ctx.config.dtype,
        )
        return future.result()


def _run_here(ctx, spec, ids, match) -> dict:
    with PeakRSS() as peak:
        result = measure(ctx.model, spec, ids, match, ctx.config.window, ctx.config.speed_new_tokens)
    result.update(peak_rss_mb=peak.peak_mb, rss_before_mb=peak.start_mb,
                  rss_scope="the benchmark process, sampled during prefill and decode (includes earlier work)")
    return result


def run_speed(ctx) -> None:
    """Each (length, method) in a fresh process when the model can be loaded by name."""
    methods = speed_methods(ctx.config, ctx.methods)
    run = _run_isolated if ctx.isolate_speed else _run_here
    for length in ctx.config.speed_lengths:
        case = build_needle_case(ctx.tokenizer, length, 0.5, 0)
        ids = as_input_ids(case.prompt_ids)
        ours: dict[float, float] = {}
        for spec in methods:
            key = f"{ctx.run_id}|speed|{length}|{spec.name}"
            if skip_finished(ctx, key, spec, ours):
                continue
            ctx.set_status(f"speed {length} tok: {spec.name}")
            row = {"suite": "speed", "key": key, "run_id": ctx.run_id, "context_tokens": length,
                   "prompt_tokens": ids.shape[1], **method_fields(spec)}
            reason = ctx.subtok_unreachable(spec) if spec.family == "subtok" else None
            if reason:
                row.update(status="unreachable", reason=reason)
            else:
                try:
                    row.update(status="ok", **run(ctx, spec, ids, ours.get(spec.budget)))
                    if spec.is_plain_subtok:
                        ours[spec.budget] = row["ratio"]
                except Exception as e:  # noqa: BLE001 - record and continue with the next method
                    row.update(status="error", reason=f"{type(e).__name__}: {e}")
            ctx.store.add(row)
            ctx.advance()


def _dense_bytes(model, tokens: int) -> int:
    """Bytes a DynamicCache holds for `tokens` tokens of `model` (2 x layers x Hkv x T x D)."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * tokens * head_dim * model.dtype.itemsize
