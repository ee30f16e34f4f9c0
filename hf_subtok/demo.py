"""`hf-subtok demo`: one long-context question answered with a dense and a compressed cache.

A pass key is hidden in a few thousand tokens of real prose; the model answers with
`model.generate()` twice, once with transformers' `DynamicCache` and once with a
`SubTokenCache` at `DEMO_PRESET`, and the two runs are printed side by side.

Each method runs in its own freshly spawned process (as the `memory` bench suite does), so
its memory figures are its own: the allocator's peak of tensor bytes above the loaded weights
(`AllocatorPeak`, the same from run to run) and the process's peak RSS. The generate that is
measured for memory runs under the profiler, so speed comes from a second generate after it.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache

from hf_subtok import PRESETS, SubTokenCache, cache_kwargs
from hf_subtok.bench.memory import AllocatorPeak, PeakRSS
from hf_subtok.recipes import recipe_for

logger = logging.getLogger(__name__)

DEMO_PRESET = "balanced"  # 25% of the dense bytes over tokens, value groups and precision
DEMO_CONTEXT_TOKENS = 3000
DEMO_DEPTH = 0.5
DEMO_SEED = 0
DEMO_MAX_NEW_TOKENS = 16


class _TokenClock:
    """A `generate` streamer that timestamps every new token (the first call is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class RunResult:
    """One `generate()` run: answer, its correctness and what the cache and process used."""

    name: str
    answer: str
    correct: bool | None
    stored_bytes: int
    dense_bytes: int
    peak_rss_mb: float
    prefill_s: float
    new_tokens: int
    decode_tok_s: float
    rss_start_mb: float | None = None  # RSS when generate began (the loaded model)
    peak_alloc_bytes: int | None = None  # allocator's peak above the weights (with allocator=True)
    pid: int | None = None  # the process the run was measured in

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else float("nan")


def dynamic_cache_bytes(cache) -> int:
    """Bytes a `DynamicCache` holds, measured from its tensors' storages."""
    return sum(
        t.untyped_storage().nbytes()
        for layer in cache.layers
        if getattr(layer, "keys", None) is not None
        for t in (layer.keys, layer.values)
    )


@torch.no_grad()
def run_generate(model, tokenizer, input_ids: torch.Tensor, cache, name: str, max_new_tokens: int, is_correct=None,
                 *, allocator: bool = False):
    """`model.generate(input_ids, cache=cache)` greedily, measured (`past_key_values=` before transformers 5.25).

    With `allocator`, generate runs under `AllocatorPeak` (its timings are then the profiler's, not the model's).
    """
    clock = _TokenClock()
    start = time.perf_counter()
    with PeakRSS() as peak, (AllocatorPeak(model.device) if allocator else nullcontext()) as alloc:
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            **cache_kwargs(cache),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=clock,
        )
    new = out[0, input_ids.shape[1]:]
    answer = tokenizer.decode(new, skip_special_tokens=True).strip()
    prefill_s = (clock.times[0] - start) if clock.times else float("nan")
    decode_s = clock.times[-1] - clock.times[0] if len(clock.times) > 1 else float("nan")
    if isinstance(cache, SubTokenCache):
        report = cache.memory_report()
        stored, dense = report["stored_bytes"], report["dense_bytes"]
    else:
        stored = dense = dynamic_cache_bytes(cache)
    return RunResult(
        name=name,
        answer=answer,
        correct=is_correct(answer) if is_correct else None,
        stored_bytes=stored,
        dense_bytes=dense,
        peak_rss_mb=peak.peak_mb,
        prefill_s=prefill_s,
        new_tokens=len(new),
        decode_tok_s=(len(clock.times) - 1) / decode_s if len(clock.times) > 1 else float("nan"),
        rss_start_mb=peak.start_mb,
        peak_alloc_bytes=alloc.peak_bytes if allocator else None,
        pid=os.getpid(),
    )


def format_side_by_side(results: list[RunResult], title: str) -> str:
    """A plain-text table, one column per run."""
    rows = [
        ("answer", [repr(r.answer[:40]) for r in results]),
        ("correct", ["-" if r.correct is None else ("yes" if r.correct else "no") for r in results]),
        ("stored KV bytes", [f"{r.stored_bytes / 2**20:.1f} MiB ({r.stored_bytes:,} B)" for r in results]),
        ("stored / dense", [f"{r.ratio:.3f}" for r in results]),
        ("peak above weights", [_mib(r.peak_alloc_bytes) for r in results]),
        ("peak RSS (own process)", [f"{r.peak_rss_mb:.0f} MiB" + _added(r) for r in results]),
        ("prefill", [f"{r.prefill_s:.2f} s" for r in results]),
        ("decode tokens/s", [f"{r.decode_tok_s:.1f} ({r.new_tokens} tokens)" for r in results]),
    ]
    first = max(len(name) for name, _ in rows)
    widths = [max(len(r.name), *(len(vals[i]) for _, vals in rows)) for i, r in enumerate(results)]
    lines = [title, ""]
    lines.append(" " * first + "   " + "   ".join(r.name.ljust(w) for r, w in zip(results, widths, strict=True)))
    for name, values in rows:
        lines.append(name.ljust(first) + "   " + "   ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f} MiB (allocator)"


def _added(result: RunResult) -> str:
    return "" if result.rss_start_mb is None else f" (+{result.peak_rss_mb - result.rss_start_mb:.0f} over the model)"


def measure_in_fresh_process(model_name: str | None, preset: str | None, ids: list[int], max_new_tokens: int,
                             name: str) -> RunResult:
    """One method's demo run in this (fresh) process: dense when `preset` is None.

    The first generate is measured for memory (under `AllocatorPeak`), the second for speed.
    """
    from hf_subtok.bench.isolated import load_model

    model, tokenizer = load_model(model_name, "float32")
    input_ids = torch.tensor([ids])

    def make_cache():
        return DynamicCache() if preset is None else SubTokenCache(model, preset)

    memory = run_generate(model, tokenizer, input_ids, make_cache(), name, max_new_tokens, allocator=True)
    timed = run_generate(model, tokenizer, input_ids, make_cache(), name, max_new_tokens)
    return replace(timed, peak_rss_mb=memory.peak_rss_mb, rss_start_mb=memory.rss_start_mb,
                   peak_alloc_bytes=memory.peak_alloc_bytes)


def demo_results(model_name: str | None = None, *, context_tokens: int = DEMO_CONTEXT_TOKENS,
                 preset: str = DEMO_PRESET, max_new_tokens: int = DEMO_MAX_NEW_TOKENS):
    """`(results, title)`: the dense and the `preset` run, each in its own spawned process."""
    from hf_subtok.bench.isolated import run_fresh
    from hf_subtok.model_loading import DEFAULT_MODEL, load_tokenizer
    from hf_subtok.tasks import build_needle_case

    tokenizer = load_tokenizer(model_name)
    case = build_needle_case(tokenizer, context_tokens, DEMO_DEPTH, DEMO_SEED)
    ids = list(case.prompt_ids)
    logger.info("Prompt: %d tokens, pass key at depth %.0f%%", len(ids), 100 * case.actual_depth)
    settings = ", ".join(f"{k}={v}" for k, v in PRESETS[preset].items())
    if "budget" in PRESETS[preset]:  # the demo's model runs in float32
        settings += f", recipe {recipe_for(PRESETS[preset]['budget'], torch.float32).candidate}"
    runs = [("dense (DynamicCache)", None), (f"subtok ({preset}: {settings})", preset)]
    results = []
    for name, chosen in runs:
        logger.info("Generating with %s in a fresh process", name)
        result = run_fresh(measure_in_fresh_process, model_name, chosen, ids, max_new_tokens, name)
        results.append(replace(result, correct=case.is_correct(result.answer)))
    title = (
        f"hf-subtok demo: {model_name or DEFAULT_MODEL}, pass key {case.answer} hidden at "
        f"{100 * case.actual_depth:.0f}% of a {len(ids)}-token prompt (each method in its own process)"
    )
    return results, title


def run_demo(model_name: str | None = None, *, context_tokens: int = DEMO_CONTEXT_TOKENS,
             preset: str = DEMO_PRESET, max_new_tokens: int = DEMO_MAX_NEW_TOKENS) -> str:
    """Run the demo and return the side-by-side table (the CLI prints it)."""
    results, title = demo_results(model_name, context_tokens=context_tokens, preset=preset,
                                  max_new_tokens=max_new_tokens)
    return format_side_by_side(results, title)
