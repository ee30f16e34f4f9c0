"""`speed` suite: prefill seconds, decode tokens/s, peak RSS and stored bytes per context length.

Unlike the quality suites, every method runs its own prefill here (that cost is what is
measured; see `method_run`). Speed hardly depends on the budget, so each method runs at its
largest budget (or bit width) only.

When the model is loaded by name, each (length, method) runs in a fresh spawned process, so
its RSS (sampled during prefill and decode, model weights included) is that method's alone; with a model
object passed in (tests), it runs in this process and RSS is sampled around it.
"""

from __future__ import annotations

import torch

from hf_subtok.bench.evaluate import method_fields
from hf_subtok.bench.isolated import load_model, run_fresh
from hf_subtok.bench.memory import PeakRSS
from hf_subtok.bench.method_run import run_method
from hf_subtok.bench.methods import MethodSpec
from hf_subtok.bench.resume import skip_finished
from hf_subtok.tasks import as_input_ids, build_needle_case


def speed_methods(config, methods):
    """Each method label once, at its first (largest) budget: speed hardly depends on it."""
    chosen: dict[str, MethodSpec] = {}
    for spec in methods:
        chosen.setdefault(spec.label, spec)
    return list(chosen.values())


def units(config, methods) -> int:
    return len(config.speed_lengths) * len(speed_methods(config, methods))


def _worker(model_name, spec: MethodSpec, ids: list[int], match, window: int | None, new_tokens: int, dtype: str,
            architecture: str | None = None) -> dict:
    """`run_method` in a fresh process, so its peak RSS is this method's alone."""
    model, _ = load_model(model_name, dtype, kvpress=spec.family == "kvpress", architecture=architecture)
    with PeakRSS() as peak:
        result = run_method(model, spec, torch.tensor([ids]), match, window, new_tokens)
    result.update(peak_rss_mb=peak.peak_mb, rss_before_mb=peak.start_mb,
                  rss_scope="a fresh process per method, sampled during prefill and decode (weights included)")
    return result


def _run_isolated(ctx, spec, ids, match) -> dict:
    return run_fresh(_worker, ctx.config.model, spec, ids[0].tolist(), match, ctx.config.window,
                     ctx.config.speed_new_tokens, ctx.config.dtype, ctx.config.architecture)


def _run_here(ctx, spec, ids, match) -> dict:
    with PeakRSS() as peak:
        result = run_method(ctx.model, spec, ids, match, ctx.config.window, ctx.config.speed_new_tokens)
    result.update(peak_rss_mb=peak.peak_mb, rss_before_mb=peak.start_mb,
                  rss_scope="the benchmark process, sampled during prefill and decode (includes earlier work)")
    return result


def run_speed(ctx) -> None:
    """Each (length, method) in a fresh process when the model can be loaded by name."""
    methods = speed_methods(ctx.config, ctx.methods)
    run = _run_isolated if ctx.isolate else _run_here
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
