"""Markdown tables and the JSON file of a benchmark run."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from hf_subtok.bench.apply import UNREACHABLE
from hf_subtok.bench.intervals import compare, wilson

DASH = "—"


def write_json(path: str | Path, meta: dict, rows: list[dict]) -> None:
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))


def _methods_in_order(rows: list[dict]) -> list[tuple[str, dict]]:
    seen: dict[str, dict] = {}
    for row in rows:
        seen.setdefault(row["method"], row)
    return list(seen.items())


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _ratio_cell(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return _status_cell(rows)
    cell = f"{_mean(r['ratio'] for r in ok):.3f}"
    if any(r.get("masked") for r in ok):
        cell += f" † (nominal {_mean(r.get('effective_ratio') for r in ok):.3f})"
    return cell


def _status_cell(rows: list[dict]) -> str:
    if any(r.get("status") == "unreachable" for r in rows):
        return UNREACHABLE
    if any(r.get("status") == "error" for r in rows):
        return "error: " + next(r["reason"] for r in rows if r.get("status") == "error")[:60]
    return DASH


def _budget_cell(row: dict) -> str:
    if row.get("bits") is not None:
        return f"{row['bits']} bit"
    return DASH if row.get("budget") is None else f"{row['budget']:g}"


def needle_tables(rows: list[dict], settings: dict[str, str]) -> list[str]:
    needle = [r for r in rows if r.get("suite") == "needle"]
    if not needle:
        return []
    lengths = sorted({r["context_tokens"] for r in needle})
    out = []
    for setting, description in settings.items():
        subset = [r for r in needle if r["setting"] == setting]
        if not subset:
            continue
        header = ["method", "budget", "stored/dense"] + [_tokens(n) for n in lengths] + ["all (95% CI)", "vs dense"]
        lines = [f"### needle: {description}", "", _row(header), _row(["---"] * len(header))]
        dense = _tally([r for r in subset if r["method"] == "dense"])
        for method, first in _methods_in_order(subset):
            mine = [r for r in subset if r["method"] == method]
            ok = [r for r in mine if r.get("status") == "ok"]
            cells = [method, _budget_cell(first), _ratio_cell(mine)]
            for n in lengths:
                at = [r for r in ok if r["context_tokens"] == n]
                cells.append(f"{sum(r['correct'] for r in at)}/{len(at)}" if at else DASH)
            cells.append(accuracy_cell(*_tally(mine)) if ok else DASH)
            versus = DASH
            if ok and dense[1] and method != "dense":
                versus = compare(*_tally(mine), *dense)
            lines.append(_row(cells + [versus]))
        out.append("\n".join(lines))
    return out


def _tally(rows: list[dict]) -> tuple[int, int]:
    """(correct, cases) of the finished needle rows among `rows`."""
    ok = [r for r in rows if r.get("status") == "ok"]
    return sum(bool(r["correct"]) for r in ok), len(ok)


def accuracy_cell(correct: int, cases: int) -> str:
    """`0.92 (0.74-0.98), n=24`: the share answered, its 95% Wilson interval, the cases."""
    low, high = wilson(correct, cases)
    return f"{correct / cases:.2f} ({low:.2f}-{high:.2f}), n={cases}"


def ppl_table(rows: list[dict]) -> list[str]:
    ppl = [r for r in rows if r.get("suite") == "ppl"]
    if not ppl:
        return []
    prefixes = sorted({r["prefix_tokens"] for r in ppl})
    dense = {r["prefix_tokens"]: r["ppl"] for r in ppl if r["method"] == "dense" and r.get("status") == "ok"}  # one-shot
    evals = sorted({r["eval_tokens"] for r in ppl})
    header = ["method", "budget", "stored/dense"]
    for p in prefixes:
        header += [f"ppl @{_tokens(p)}", f"Δ vs dense @{_tokens(p)}"]
    title = f"### ppl: perplexity of {', '.join(map(str, evals))} tokens after a compressed prefix"
    lines = [title, "", _row(header), _row(["---"] * len(header))]
    for method, first in _methods_in_order(ppl):
        mine = [r for r in ppl if r["method"] == method]
        cells = [method, _budget_cell(first), _ratio_cell(mine)]
        for p in prefixes:
            at = [r for r in mine if r["prefix_tokens"] == p and r.get("status") == "ok"]
            if at:
                value = at[0]["ppl"]
                base = dense.get(p)
                cells += [f"{value:.3f}", f"{100 * (value / base - 1):+.1f}%" if base else DASH]
            else:
                cells += [DASH, DASH]
        lines.append(_row(cells))
    return ["\n".join(lines)]


def speed_table(rows: list[dict]) -> list[str]:
    speed = [r for r in rows if r.get("suite") == "speed"]
    if not speed:
        return []
    header = ["method", "budget", "context", "prefill s", "decode tok/s", "peak RSS MB (+ over start)", "stored MB",
              "stored/dense"]
    lines = ["### speed", "", _row(header), _row(["---"] * len(header))]
    for r in speed:
        if r.get("status") != "ok":
            cells = [r["method"], _budget_cell(r), _tokens(r["context_tokens"]), _status_cell([r])] + [DASH] * 4
        else:
            cells = [
                r["method"], _budget_cell(r), _tokens(r["context_tokens"]), f"{r['prefill_s']:.2f}",
                f"{r['decode_tok_s']:.1f}", f"{r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r.get('rss_before_mb', r['peak_rss_mb']):.0f})",
                f"{r['stored_bytes'] / 2**20:.1f}",
                _ratio_cell([r]),
            ]
        lines.append(_row(cells))
    return ["\n".join(lines)]


def notes(meta: dict, rows: list[dict]) -> str:
    lines = ["### how to read this", ""]
    dtype = meta.get("dtype") or meta.get("model", {}).get("dtype")
    lines.append(
        "- stored/dense: bytes the cache holds after compressing the context (every tensor: keys, "
        "values, indices, masks, scales), divided by what a DynamicCache holds for the same tokens"
        + (f" in {dtype}, the dtype the model ran in" if dtype else "") + "; mean over cases."
    )
    lines.append(
        "- prefill: one dense prefill per case is shared by every method (prefill attention is exact for all of "
        "them); needle cells are correct/cases; vs dense: whether the row's 95% interval lies above or below "
        "dense's, or the two overlap (then these cases do not rank them)."
    )
    if meta.get("matching"):
        lines.append(f"- matching: {meta['matching']}")
    if meta.get("quantized_note"):
        versions = ", ".join(f"{b} {v or '?'}" for b, v in (meta.get("quantized_backends") or {}).items())
        lines.append(f"- quantized: {meta['quantized_note']}" + (f" Backends: {versions}." if versions else ""))
    if any(r.get("masked") for r in rows):
        lines.append(f"- † {meta.get('masking_note')}")
    check = meta.get("shared_prefill_check")
    if check:
        results = {}
        for per_press in check.values():
            for press, r in per_press.items():
                results[press] = results.get(press, True) and r["identical"]
        same = [p for p, ok in results.items() if ok]
        differ = [p for p, ok in results.items() if not ok]
        text = (
            f"- shared prefill vs kvpress's own hooks, checked on the first case of each setting ({', '.join(check)}): "
            f"bit-identical caches for {', '.join(same) or 'none'}"
        )
        if differ:
            text += f"; different for {', '.join(differ)} (those presses ran their own prefill per case)"
        lines.append(text)
    speed = [r for r in rows if r.get("suite") == "speed" and r.get("status") == "ok"]
    if speed:
        scopes = sorted({r.get("rss_scope", "benchmark process") for r in speed})
        lines.append(
            f"- speed: each method prefills its own way (dense, through SubTokenCache or QuantizedCache, or under the press's hooks), "
            f"then decodes {speed[0].get('decode_tokens')} greedy tokens; peak RSS measured in: {', '.join(scopes)}"
        )
    machine = meta.get("machine", {})
    if machine:
        lines.append(
            f"- machine: {machine.get('processor')}, {machine.get('cpu_count')} CPU cores, "
            f"{machine.get('memory_gb')} GB, torch {machine.get('torch')}, transformers "
            f"{machine.get('transformers')}, kvpress {machine.get('kvpress') or 'not installed'}"
        )
    model = meta.get("model", {})
    if model:
        lines.append(
            f"- model: {model.get('name_or_path')} as {model.get('model_class') or model.get('model_type')} "
            f"({model.get('num_layers')} layers, "
            f"{model.get('num_kv_heads')} KV heads, head_dim {model.get('head_dim')}, {model.get('dtype')})"
        )
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    return "\n".join(lines)


def markdown_report(meta: dict, rows: list[dict]) -> str:
    """The run as Markdown: needle tables (both settings), ppl, speed, then notes."""
    parts = needle_tables(rows, meta.get("settings", {})) + ppl_table(rows) + speed_table(rows)
    parts.append(notes(meta, rows))
    return "\n\n".join(parts) + "\n"


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def group_by(rows: list[dict], *fields: str) -> dict:
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(f) for f in fields)].append(row)
    return groups
