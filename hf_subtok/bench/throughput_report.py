"""Medians, ratios against dense, tables, summary files and the peak-memory plot of the
`memory` and `throughput` suites (rows from `throughput.run_footprint`)."""

from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path

from hf_subtok.bench.report import DASH, group_by

logger = logging.getLogger(__name__)

MIB = 2**20
_MEDIANS = ("peak_alloc_bytes", "peak_rss_added_bytes", "peak_rss_bytes", "rss_start_bytes", "prefill_s",
            "decode_tok_s", "stored_bytes", "dense_bytes", "ratio")
SUMMARY_FIELDS = ("method", "context_tokens", "prompt_tokens", "batch", "runs", "status", *_MEDIANS,
                  "alloc_spread", "rss_spread", "peak_vs_dense", "peak_drop_of_kv_saved", "prefill_vs_dense",
                  "decode_vs_dense")


def footprint_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if set(str(r.get("suite", "")).split("+")) & {"memory", "throughput"}]


def _spread(values: list[float]) -> float | None:
    """(max - min) / median: how far repeated runs disagree."""
    if len(values) < 2:
        return None
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle else None


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (case, method): medians over repeats, spreads, ratios against dense (a row
    prefilled in chunks against dense prefilled in the same chunks where that ran, else one-shot).

    `peak_drop_of_kv_saved`: how much of the KV bytes a method saves against dense its peak
    (allocator) drops by, `(dense peak - peak) / (dense stored - stored)`: 1.0 means the whole
    saving shows in the peak.
    """
    summary = []
    for (method, tokens, batch), group in group_by(footprint_rows(rows), "method", "context_tokens", "batch").items():
        ok = [r for r in group if r.get("status") == "ok"]
        entry = {"method": method, "context_tokens": tokens, "batch": batch, "runs": len(ok),
                 "prompt_tokens": group[0].get("prompt_tokens"), "family": group[0].get("family"),
                 "prefill_chunk": group[0].get("prefill_chunk"),
                 "status": "ok" if ok else group[0].get("status"), "reason": None if ok else group[0].get("reason")}
        for name in _MEDIANS:
            values = [r[name] for r in ok if r.get(name) is not None]
            entry[name] = statistics.median(values) if values else None
        entry["alloc_spread"] = _spread([r["peak_alloc_bytes"] for r in ok if "peak_alloc_bytes" in r])
        entry["rss_spread"] = _spread([r["peak_rss_added_bytes"] for r in ok if "peak_rss_added_bytes" in r])
        summary.append(entry)
    # each row against dense with the same chunking where it ran, else one-shot dense
    dense = {(s["context_tokens"], s["batch"], s["prefill_chunk"]): s for s in summary
             if s["family"] == "dense" and s["status"] == "ok"}
    for s in summary:
        base = dense.get((s["context_tokens"], s["batch"], s["prefill_chunk"]), dense.get((s["context_tokens"], s["batch"], None)))
        s["peak_vs_dense"] = _over(s, base, "peak_alloc_bytes")
        s["prefill_vs_dense"] = _over(s, base, "prefill_s")
        s["decode_vs_dense"] = _over(s, base, "decode_tok_s")
        s["peak_drop_of_kv_saved"] = None
        if base and s["peak_alloc_bytes"] is not None and base["peak_alloc_bytes"] is not None and s is not base:
            saved = base["stored_bytes"] - s["stored_bytes"]
            if saved > 0:
                s["peak_drop_of_kv_saved"] = (base["peak_alloc_bytes"] - s["peak_alloc_bytes"]) / saved
    return summary


def _over(entry: dict, base: dict | None, name: str) -> float | None:
    if base is None or entry.get(name) is None or not base.get(name):
        return None
    return entry[name] / base[name]


def _case(entry: dict) -> str:
    tokens = _tokens(entry["context_tokens"])
    return tokens if entry["batch"] == 1 else f"{entry['batch']} x {tokens}"


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _fmt(value, spec: str, suffix: str = "") -> str:
    return DASH if value is None else f"{value:{spec}}{suffix}"


def _mib(value) -> float | None:
    return None if value is None else value / MIB


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_tables(rows: list[dict]) -> list[str]:
    """The memory table and/or the throughput table, medians over the repeated runs."""
    summary = summarize(rows)
    if not summary:
        return []
    runs = max(s["runs"] for s in summary)
    tables = []
    if any(s["peak_alloc_bytes"] is not None for s in summary):
        header = ["method", "context", "stored/dense", "KV stored MiB", "peak above weights MiB (allocator)", "× dense",
                  "peak drop / KV saved", "peak RSS above start MiB", "RSS spread"]
        lines = [f"### memory: peak above the loaded weights, median of {runs} fresh process(es) per cell", "",
                 _row(header), _row(["---"] * len(header))]
        for s in summary:
            if s["status"] != "ok":
                lines.append(_row([s["method"], _case(s), f"{s['status']}: {str(s['reason'])[:60]}"] + [DASH] * 6))
                continue
            lines.append(_row([
                s["method"], _case(s), _fmt(s["ratio"], ".3f"), _fmt(_mib(s["stored_bytes"]), ".1f"),
                _fmt(_mib(s["peak_alloc_bytes"]), ".1f") + (f" (±{100 * s['alloc_spread'] / 2:.1f}%)" if s["alloc_spread"] else ""),
                _fmt(s["peak_vs_dense"], ".2f"), _fmt(s["peak_drop_of_kv_saved"], ".0%"),
                _fmt(_mib(s["peak_rss_added_bytes"]), ".0f"), _fmt(s["rss_spread"], ".0%"),
            ]))
        tables.append("\n".join(lines))
    if any(s["prefill_s"] is not None for s in summary):
        header = ["method", "context", "prefill s", "× dense", "decode tok/s", "× dense", "stored/dense"]
        lines = [f"### throughput: median of {runs} fresh process(es) per cell (decode tok/s counts every row's tokens)",
                 "", _row(header), _row(["---"] * len(header))]
        for s in summary:
            if s["status"] != "ok":
                lines.append(_row([s["method"], _case(s), f"{s['status']}: {str(s['reason'])[:60]}"] + [DASH] * 4))
                continue
            lines.append(_row([s["method"], _case(s), _fmt(s["prefill_s"], ".2f"), _fmt(s["prefill_vs_dense"], ".2f"),
                               _fmt(s["decode_tok_s"], ".1f"), _fmt(s["decode_vs_dense"], ".2f"), _fmt(s["ratio"], ".3f")]))
        tables.append("\n".join(lines))
    tables.append(_notes(footprint_rows(rows)))
    return tables


def _notes(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    fresh = {r.get("process") for r in ok} == {"fresh"}
    where = ("each run in its own freshly spawned process (model loaded there, method warmed up on "
             "a short prompt first)") if fresh else "in the benchmark process (a model object was passed in)"
    lines = ["### how to read the memory and throughput tables", "",
             f"- every cell: {where}; values are medians over the runs.",
             "- peak above weights (allocator): the most tensor bytes alive at once during prefill and decode, "
             "counted from torch's allocation events (CPU: torch.profiler memory events; CUDA: "
             "max_memory_allocated); identical from run to run. ± is half the spread of the runs.",
             "- peak drop / KV saved: (dense's peak - this peak) / (dense's stored bytes - these stored bytes).",
             "- peak RSS above start: resident memory above the process's RSS after loading the model; it "
             "includes allocator caching and moves from run to run (RSS spread = (max - min) / median)."]
    decode = next((r["decode_tokens"] // r["batch"] for r in ok if r.get("decode_tokens")), None)
    if decode:
        lines.append(f"- throughput: prefill of the whole batch through the method's own cache, then {decode} greedy "
                     "decode steps timed outside the profiler; decode tok/s = rows x steps / seconds.")
    return "\n".join(lines)


def write_summary(out: Path, rows: list[dict], title: str = "") -> dict[str, str]:
    """`footprint_summary.csv`, `.json` and `peak_memory.png` (titled `title`) in `out`; returns their paths."""
    summary = summarize(rows)
    paths = {"footprint_csv": str(out / "footprint_summary.csv"), "footprint_json": str(out / "footprint_summary.json")}
    with open(paths["footprint_csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary)
    Path(paths["footprint_json"]).write_text(json.dumps(summary, indent=1))
    plot = plot_peak_memory(summary, out / "peak_memory.png", title)
    if plot:
        paths["peak_memory_plot"] = plot
    return paths


def plot_peak_memory(summary: list[dict], path: str | Path, title: str = "") -> str | None:
    """Peak memory above the weights against context length (batch-1 cases), one line per
    method: allocator peak and, beside it, peak RSS. Returns the path, or None without points."""
    points = [s for s in summary if s["batch"] == 1 and s["status"] == "ok" and s["peak_alloc_bytes"] is not None]
    if not points:
        logger.info("no memory rows at batch 1: no peak-memory plot")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    panels = (("peak_alloc_bytes", "allocator peak above weights (MiB)"), ("peak_rss_added_bytes", "peak RSS above start (MiB)"))
    for ax, (name, label) in zip(axes, panels, strict=True):
        for i, (method, group) in enumerate(group_by(points, "method").items()):
            group = sorted(group, key=lambda s: s["context_tokens"])
            xs = [s["context_tokens"] for s in group]
            ys = [s[name] / MIB for s in group]
            ax.plot(xs, ys, marker="os^vD<>pPX*h"[i % 12], color=f"C{i % 10}", label=method[0])
        ax.set_xlabel("context tokens (batch 1)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "peak memory against context length (median of fresh processes)", fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
