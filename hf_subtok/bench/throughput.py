"""`memory` and `throughput` suites: what a method costs end to end, each run in a fresh process.

For every case (a context length at batch 1, and one batch of several prompts) and method,
`repeats` fresh spawned processes each load the model, warm the method up on a short slice
of the prompt, then:

- memory: prefill and decode under `AllocatorPeak` (the allocator's peak of live tensor bytes
  above the loaded weights; identical from run to run) and `PeakRSS` (resident memory above
  the process's RSS after loading, which the operating system sees and which moves from run
  to run);
- throughput: the same prefill and decode again outside the profiler, timed: prefill
  seconds, decode tokens/s (every row's tokens), stored bytes / dense bytes.

Rows are one per (case, method, repeat); `throughput_report` turns them into medians, ratios
against dense, tables and the plot of peak memory against context length. With a model object
passed to `run_bench` (tests), the cases run in the calling process instead.

Presses are matched to the stored bytes of the subtok row (plain or preset) with the same
budget in the same case, measured first (e.g. `kvpress:tova@0.25` at `balanced`'s bytes).
"""

from __future__ import annotations

import gc
import logging
import os

import torch

from hf_subtok.bench.evaluate import method_fields
from hf_subtok.bench.isolated import load_model, run_fresh
from hf_subtok.bench.memory import AllocatorPeak, PeakRSS
from hf_subtok.bench.method_run import run_method
from hf_subtok.bench.methods import MethodSpec, kvpress_available
from hf_subtok.tasks import build_needle_case

logger = logging.getLogger(__name__)

SUITES = ("memory", "throughput")
BEST_PRESS = "kvpress:tova@0.25"  # best needle retrieval of the presses at 25% (BENCHMARKS.md), at balanced's bytes
DEFAULT_METHODS = ("dense", "subtok:groups-only", "subtok:balanced", "subtok:aggressive", "subtok:compact",
                   BEST_PRESS, "quantized:quanto")
WARMUP_TOKENS = 256  # the method's first run (imports, lazy set-up, the profiler's own start) on this many


def default_methods(have_kvpress: bool | None = None) -> str:
    """The `--methods` these suites run when none are given; the press only where kvpress is."""
    if have_kvpress is None:
        have_kvpress = kvpress_available()
    return ",".join(m for m in DEFAULT_METHODS if have_kvpress or m != BEST_PRESS)


def parse_batch(text: str) -> tuple[int, int] | None:
    """`"8x2k"` -> `(8, 2048)`: a batch of 8 prompts of 2,048 tokens; `"none"` -> None."""
    from hf_subtok.bench.methods import parse_ints

    if text.strip().lower() == "none":
        return None
    rows, sep, tokens = text.lower().partition("x")
    if not sep:
        raise ValueError(f"batch must be ROWSxTOKENS (e.g. 8x2k) or none, got {text!r}")
    (batch,) = parse_ints("batch rows", rows, low=1)
    (length,) = parse_ints("batch tokens", tokens, low=64)
    return batch, length


def cases(config) -> list[tuple[int, int]]:
    """`(context_tokens, batch)` of every case: each memory context at batch 1, then the batch."""
    grid = [(tokens, 1) for tokens in config.memory_contexts]
    if config.memory_batch is not None:
        batch, tokens = config.memory_batch
        grid.append((tokens, batch))
    return list(dict.fromkeys(grid))


def phases(config) -> list[str]:
    """The suites of `SUITES` this run names, in order."""
    return [s for s in SUITES if s in config.suites]


def units(config, methods) -> int:
    return len(cases(config)) * len(methods) * config.memory_repeats


def row_key(config, rid: str, tokens: int, batch: int, method: str, repeat: int) -> str:
    return (f"{rid}|{'+'.join(phases(config))}|{tokens}x{batch}|n{config.memory_new_tokens}|{config.device}|"
            f"{method}|r{repeat}")


def grid_keys(config, rid: str) -> list[str]:
    return [row_key(config, rid, tokens, batch, m.name, r) for tokens, batch in cases(config)
            for m in config.methods for r in range(config.memory_repeats)]


def prompt_ids(tokenizer, tokens: int, batch: int) -> torch.Tensor:
    """`[B, T]` pass-key prompts of about `tokens` tokens, the needle at a different depth and
    key in each row, cut to the shortest row's length (keeping each row's end: the question)."""
    rows = [build_needle_case(tokenizer, tokens, (i + 0.5) / batch, i).prompt_ids for i in range(batch)]
    length = min(len(r) for r in rows)
    return torch.tensor([list(r)[len(r) - length:] for r in rows], dtype=torch.long)


@torch.no_grad()
def measure_case(model, spec: MethodSpec, ids: torch.Tensor, match: float | None, window: int | None, new_tokens: int,
                 wanted: list[str]) -> dict:
    """Warm `spec` up, then measure its memory and/or throughput on `ids` `[B, T]` (see module)."""
    device = ids.device
    with AllocatorPeak(device):
        run_method(model, spec, ids[:, -WARMUP_TOKENS:], match, window, 2)
    gc.collect()
    result = {"pid": os.getpid(), "weights_bytes": sum(p.nbytes for p in model.parameters())}
    if "memory" in wanted:
        with AllocatorPeak(device) as allocator, PeakRSS() as rss:
            measured = run_method(model, spec, ids, match, window, new_tokens)
        result.update(peak_alloc_bytes=allocator.peak_bytes, rss_start_bytes=rss.start_bytes,
                      peak_rss_bytes=rss.peak_bytes, peak_rss_added_bytes=rss.added_bytes)
        gc.collect()
    if "throughput" in wanted:
        measured = run_method(model, spec, ids, match, window, new_tokens)
        result.update({k: measured[k] for k in ("prefill_s", "decode_s", "decode_tokens", "decode_tok_s")})
    result.update({k: v for k, v in measured.items() if k in ("stored_bytes", "dense_bytes", "ratio", "compression_ratio")})
    return result


def _fresh_worker(model_name, dtype: str, device: str, spec: MethodSpec, ids: list[list[int]], match, window: int | None,
                  new_tokens: int, wanted: list[str], architecture: str | None = None) -> dict:
    """`measure_case` in a fresh process: the model loaded by name there, nothing else."""
    model, _ = load_model(model_name, dtype, device, kvpress=spec.family == "kvpress", architecture=architecture)
    return measure_case(model, spec, torch.tensor(ids, device=device), match, window, new_tokens, wanted)


def _measure(ctx, spec: MethodSpec, ids: torch.Tensor, match: float | None) -> dict:
    config = ctx.config
    if ctx.isolate:
        result = run_fresh(_fresh_worker, config.model, config.dtype, config.device, spec, ids.tolist(), match,
                           config.window, config.memory_new_tokens, phases(config), config.architecture)
        return {**result, "process": "fresh"}
    result = measure_case(ctx.model, spec, ids.to(ctx.model.device), match, config.window, config.memory_new_tokens,
                          phases(config))
    return {**result, "process": "shared"}


def run_footprint(ctx) -> None:
    """Every (case, method, repeat) of the run's grid not already in the store; one row each."""
    config = ctx.config
    for tokens, batch in cases(config):
        ids = prompt_ids(ctx.tokenizer, tokens, batch)
        matched: dict[float, float] = {}  # budget -> stored ratio subtok measured in this case
        for spec in config.methods:
            for repeat in range(config.memory_repeats):
                key = row_key(config, ctx.run_id, tokens, batch, spec.name, repeat)
                done = ctx.store.get(key)
                if done is not None and done.get("status") != "error":
                    _remember_ratio(matched, spec, done)
                    ctx.advance()
                    continue
                ctx.set_status(f"{'+'.join(phases(config))} {batch}x{tokens} tok: {spec.name} (run {repeat + 1})")
                row = {"suite": "+".join(phases(config)), "key": key, "run_id": ctx.run_id, "context_tokens": tokens,
                       "prompt_tokens": ids.shape[1], "batch": batch, "repeat": repeat, "device": config.device,
                       **method_fields(spec)}
                reason = ctx.subtok_unreachable(spec) if spec.family == "subtok" else None
                if reason:
                    row.update(status="unreachable", reason=reason)
                else:
                    try:
                        match = matched.get(spec.budget) if spec.family == "kvpress" else None
                        row.update(status="ok", **_measure(ctx, spec, ids, match))
                    except Exception as e:  # noqa: BLE001 - record and continue with the next method
                        logger.warning("%s at %dx%d failed: %s: %s", spec.name, batch, tokens, type(e).__name__, e)
                        row.update(status="error", reason=f"{type(e).__name__}: {e}")
                _remember_ratio(matched, spec, row)
                ctx.store.add(row)
                ctx.advance()


def _remember_ratio(matched: dict[float, float], spec: MethodSpec, row: dict) -> None:
    if spec.family == "subtok" and spec.budget is not None and row.get("status") == "ok":
        matched.setdefault(spec.budget, row["ratio"])
