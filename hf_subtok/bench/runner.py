"""`run_bench`: the benchmark grid, shared prefills, resume, and the outputs it writes."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_subtok.bench import needle, ppl, ruler_eval, speed, throughput
from hf_subtok.bench.apply import check_subtok_reachable
from hf_subtok.bench.methods import MethodSpec, kvpress_available
from hf_subtok.bench.resume import ResultStore, code_fingerprint, run_id
from hf_subtok.bench.ruler import FAMILIES as RULER_FAMILIES
from hf_subtok.model_classes import ARCHITECTURES, as_architecture

logger = logging.getLogger(__name__)

SUITES = ("needle", "ppl", "speed")
OPTIONAL_SUITES = ("ruler", *throughput.SUITES)  # run only when named (--suite ruler, --suite memory,throughput)
DEFAULT_BUDGETS = (0.75, 0.5, 0.375, 0.25, 0.125)
QUICK_BUDGETS = (0.75, 0.25)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BenchConfig:
    """The grid of one benchmark run. `full()` and `quick()` give the two standard grids."""

    suites: list[str] = field(default_factory=lambda: list(SUITES))
    methods: list[MethodSpec] = field(default_factory=list)
    budgets: list[float] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    needle_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    needle_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    needle_seeds: list[int] = field(default_factory=lambda: [0])
    ppl_prefix_lengths: list[int] = field(default_factory=lambda: [4096])
    ppl_eval_tokens: int = 512
    ppl_text: str = "ppl"  # a shipped text ("ppl": the book, "legal": the US Constitution) or a file path
    ruler_contexts: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    ruler_cases: int = 5  # per family, context and setting
    ruler_families: list[str] = field(default_factory=lambda: list(RULER_FAMILIES))
    ruler_seed: int = 0
    ruler_max_new_tokens: int | None = None  # None: RULER's tokens to generate per family
    speed_lengths: list[int] = field(default_factory=lambda: [1024, 4096])
    speed_new_tokens: int = 16
    memory_contexts: list[int] = field(default_factory=lambda: [2048, 4096, 8192])  # memory/throughput, batch 1
    memory_batch: tuple[int, int] | None = (8, 2048)  # (rows, tokens) of the batch case; None: none
    memory_repeats: int = 3  # fresh processes per (case, method); the tables give medians
    memory_new_tokens: int = 32  # decode steps timed (and held in memory) after the prefill
    device: str = "cpu"  # where memory/throughput load the model ("cuda": peaks from max_memory_allocated)
    max_new_tokens: int = 12  # 'The pass key is 12345' is 10 tokens; generation stops once correct
    window: int | None = None  # subtok's dense window; None: the config's (or its recipe's)
    out_dir: str = "bench_out"
    model: str | None = None
    architecture: str | None = None  # None: the checkpoint's class; llama/mistral/qwen2: a Llama's weights in it
    dtype: str = "float32"  # the model runs in it; every ratio is against the dense cache in it
    quick: bool = False
    restart: bool = False

    @classmethod
    def quick_grid(cls, **overrides) -> BenchConfig:
        """A grid that runs in a couple of minutes on 2 CPU cores."""
        grid = dict(
            needle_lengths=[1024],
            needle_depths=[0.5],
            ppl_prefix_lengths=[512],
            ppl_eval_tokens=128,
            speed_lengths=[512],
            speed_new_tokens=8,
            memory_contexts=[1024],
            memory_batch=(2, 512),
            memory_repeats=1,
            memory_new_tokens=8,
            ruler_contexts=[1024],
            ruler_cases=1,
            budgets=list(QUICK_BUDGETS),
            quick=True,
        )
        grid.update(overrides)
        return cls(**grid)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.architecture is not None and self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)} or None, got {self.architecture!r}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        for name in ("memory_repeats", "memory_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        unknown = [f for f in self.ruler_families if f not in RULER_FAMILIES]
        if unknown or self.ruler_cases < 1:
            raise ValueError(f"ruler families must be among {', '.join(RULER_FAMILIES)} and ruler_cases >= 1, got "
                             f"{self.ruler_families!r} and {self.ruler_cases!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["methods"] = [m.name for m in self.methods]
        return d


class BenchContext:
    """Everything the suites share in one run: model, store, progress, press verification."""

    def __init__(self, config: BenchConfig, model, tokenizer, store: ResultStore, rid: str, total: int):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.run_id = rid
        self.methods = config.methods
        self.has_kvpress = any(m.family == "kvpress" for m in self.methods)
        self.hooked_presses: set[str] = set()
        self.verification: dict[str, dict] = {}
        self._unreachable: dict[tuple, str | None] = {}
        self.isolate = False  # speed, memory, throughput cases in fresh processes (model loadable by name)
        self.bar = tqdm(total=total, desc="hf-subtok bench", unit="case", leave=False, dynamic_ncols=True)

    @property
    def needs_hidden(self) -> bool:
        """Whether shared prefills must capture hidden states (for kvpress scorers)."""
        return self.has_kvpress

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_status(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=False)
        logger.info(text)

    def all_done(self, prefixes) -> bool:
        return all(
            (row := self.store.get(f"{self.run_id}|{p}|{m.name}")) is not None and row.get("status") != "error"
            for p in prefixes
            for m in self.methods
        )

    def subtok_unreachable(self, spec: MethodSpec | float) -> str | None:
        """Why subtok `spec` (or plain `subtok@budget`) cannot be built for this model, or None."""
        if not isinstance(spec, MethodSpec):
            spec = MethodSpec("subtok", spec)
        key = (spec.budget, spec.variant)
        if key not in self._unreachable:
            self._unreachable[key] = check_subtok_reachable(self.model, spec.budget, self.config.window, spec.options)
        return self._unreachable[key]

    def maybe_verify_presses(self, where: str, input_ids, prefill, *, unless_checked: bool = False) -> None:
        """Once per `where`: check the shared-prefill press path against kvpress's own hooks.

        A press whose cache differs runs its own prefill under kvpress's hooks from then on.
        With `unless_checked`, skip when any other check already ran (same code path).
        """
        if not self.has_kvpress or where in self.verification or (unless_checked and self.verification):
            return
        from hf_subtok.bench.kvpress_methods import verify_shared_path

        presses = list(dict.fromkeys(m.press for m in self.methods if m.family == "kvpress"))
        ratio = 1.0 - max(m.budget for m in self.methods if m.family == "kvpress")
        self.set_status(f"checking the shared-prefill press path against kvpress's own hooks ({where})")
        self.verification[where] = verify_shared_path(self.model, presses, ratio, input_ids, prefill)
        self.hooked_presses |= {p for p, r in self.verification[where].items() if not r["identical"]}

    def close(self) -> None:
        self.bar.close()


def machine_info() -> dict:
    """Where the numbers were measured."""
    import transformers

    from hf_subtok.bench.kvpress_methods import kvpress_version

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": _cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvpress": kvpress_version(),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def total_units(config: BenchConfig) -> int:
    n = len(config.methods)
    total = 0
    if "needle" in config.suites:
        total += needle.units(config, n)
    if "ppl" in config.suites:
        total += ppl.units(config, n)
    if "speed" in config.suites:
        total += speed.units(config, config.methods)
    if "ruler" in config.suites:
        total += ruler_eval.units(config, n)
    if throughput.phases(config):
        total += throughput.units(config, config.methods)
    return total


def run_bench(config: BenchConfig, model=None, tokenizer=None, *, command: str | None = None) -> dict:
    """Run (or resume) the grid; write `cases.jsonl`, `results.json`, `results.md`, the plot.

    Args:
        config: the grid and output folder.
        model, tokenizer: already loaded ones (tests; `config.architecture` re-houses the model), else
            `config.model` is loaded.
        command: the command line, quoted in the report.

    Returns:
        `{"meta": ..., "rows": [...], "markdown": str, "paths": {...}}`.
    """
    from hf_subtok.bench.plot import plot_quality_vs_ratio
    from hf_subtok.bench.report import markdown_report, write_json

    if any(m.family == "kvpress" for m in config.methods):
        from hf_subtok.bench.kvpress_methods import import_kvpress

        import_kvpress()  # before any SubTokenCache registers its attention (see import_kvpress)
    isolate = model is None
    if model is None:
        from hf_subtok.model_loading import load_model_and_tokenizer

        logger.info("Loading model %s in %s (class: %s)", config.model or "(embedded default)", config.dtype,
                    config.architecture or "the checkpoint's")
        model, tokenizer = load_model_and_tokenizer(config.model, dtype=config.torch_dtype,
                                                    architecture=config.architecture)
    elif model.dtype != config.torch_dtype:
        raise ValueError(f"dtype={config.dtype!r} but the model given runs in {str(model.dtype).removeprefix('torch.')}")
    elif config.architecture is not None:
        model = as_architecture(model, config.architecture)  # unchanged when already of that class
    from hf_subtok.model_loading import model_fingerprint

    fingerprint = model_fingerprint(model)
    settings = {
        "model": fingerprint,  # includes the dtype the model runs in
        "window": config.window,
        "max_new_tokens": config.max_new_tokens,
        "speed_new_tokens": config.speed_new_tokens,
        "ppl_eval_tokens": config.ppl_eval_tokens,
        "kvpress": kvpress_available(),
        "code": code_fingerprint(),
    }
    rid = run_id(settings)
    out = Path(config.out_dir)
    store = ResultStore(out, restart=config.restart)
    ctx = BenchContext(config, model, tokenizer, store, rid, total_units(config))
    ctx.isolate = isolate
    started = time.perf_counter()
    try:
        runners = {"needle": needle.run_needle, "ppl": ppl.run_ppl, "speed": speed.run_speed,
                   "ruler": ruler_eval.run_ruler, "memory": throughput.run_footprint, "throughput": throughput.run_footprint}
        for run in dict.fromkeys(runners[suite] for suite in config.suites):  # memory+throughput: one pass
            run(ctx)
    finally:
        ctx.close()
    elapsed = time.perf_counter() - started
    keys = _grid_keys(config, rid)
    rows = [store.rows[k] for k in keys if k in store.rows]
    meta = {
        "config": config.to_dict(),
        "run_id": rid,
        "code_fingerprint": settings["code"],
        "model": fingerprint,
        "dtype": config.dtype,
        "machine": machine_info(),
        "command": command,
        "elapsed_s_this_invocation": round(elapsed, 1),
        "matching": None,
        "shared_prefill_check": ctx.verification or None,
        "settings": needle.SETTINGS,
    }
    if ctx.has_kvpress:
        from hf_subtok.bench.kvpress_methods import MASKING_NOTE, MATCHING

        meta["matching"] = MATCHING
        meta["masking_note"] = MASKING_NOTE
    if any(m.family == "quantized" for m in config.methods):
        from hf_subtok.bench.quantized_methods import QUANTIZED_NOTE, backend_version

        meta["quantized_note"] = QUANTIZED_NOTE
        meta["quantized_backends"] = {b: backend_version(b) for b in dict.fromkeys(
            m.backend for m in config.methods if m.family == "quantized")}
    paths = {
        "jsonl": str(store.path),
        "json": str(out / "results.json"),
        "markdown": str(out / "results.md"),
    }
    markdown = markdown_report(meta, rows)
    if "ruler" in config.suites:
        paths.update(ruler_eval.write_summary(out, rows))
        markdown = "\n\n".join(ruler_eval.markdown_tables(rows) + [markdown])
    if throughput.phases(config):
        from hf_subtok.bench import throughput_report

        title = f"{fingerprint['name_or_path']} ({config.dtype}, {config.device}): peak memory against context length"
        paths.update(throughput_report.write_summary(out, rows, title))
        markdown = "\n\n".join(throughput_report.markdown_tables(rows) + [markdown])
    write_json(paths["json"], meta, rows)
    Path(paths["markdown"]).write_text(markdown)
    if {"needle", "ppl"} & set(config.suites):
        paths["plot"] = str(out / "quality_vs_ratio.png")
        plot_quality_vs_ratio(rows, paths["plot"], title=f"{fingerprint['name_or_path']}: quality vs stored bytes")
    return {"meta": meta, "rows": rows, "markdown": markdown, "paths": paths}


def run_ruler_suite(methods: list[MethodSpec], model=None, tokenizer=None, *, contexts=(2048, 4096, 8192),
                    cases: int = 5, families=RULER_FAMILIES, out_dir: str = "bench_out/ruler", **config) -> list[dict]:
    """Run the RULER-style suite for `methods` and return `ruler_eval.summarize`'s rows
    `{family, setting, context, method, cases, correct, score, ci_low, ci_high, ...}`.

    `model`, `tokenizer` as in `run_bench`; other `BenchConfig` fields go in `config`.
    """
    bench = BenchConfig(suites=["ruler"], methods=list(methods), ruler_contexts=list(contexts), ruler_cases=cases,
                        ruler_families=list(families), out_dir=out_dir, **config)
    return ruler_eval.summarize(run_bench(bench, model, tokenizer)["rows"])


def _grid_keys(config: BenchConfig, rid: str) -> list[str]:
    """Keys of every row this grid produces, in table order."""
    keys = []
    if "needle" in config.suites:
        for spec in needle.needle_specs(config):
            for setting in needle.SETTINGS:
                keys += [f"{rid}|{spec.key}|{setting}|{m.name}" for m in config.methods]
    if "ppl" in config.suites:
        for spec in ppl.ppl_specs(config):
            keys += [f"{rid}|{spec.key}|{m.name}" for m in config.methods]
    if "speed" in config.suites:
        for length in config.speed_lengths:
            keys += [f"{rid}|speed|{length}|{m.name}" for m in speed.speed_methods(config, config.methods)]
    if "ruler" in config.suites:
        keys += ruler_eval.grid_keys(config, rid)
    if throughput.phases(config):
        keys += throughput.grid_keys(config, rid)
    return keys
