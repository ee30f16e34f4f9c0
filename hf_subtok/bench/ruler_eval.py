"""`ruler` suite: the RULER-style families of `hf_subtok.bench.ruler` through every method.

Like `needle`: per case and setting (`in_prompt`: the question inside the compressed prompt;
`after`: the context compressed first, the question fed afterwards), one dense prefill of
exactly the tokens that get compressed is shared by every method, then each method's cache
answers greedily (at most RULER's tokens to generate per family, or
`BenchConfig.ruler_max_new_tokens`; generation stops early once the score is 1, which
cannot change it). One row per (case, setting, method), its task family under `task`
(`family` is the method's); `summarize` turns them into one row per (family, setting,
context, method) with the mean score and its 95% Wilson interval.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from hf_subtok.bench.decoding import eos_ids, greedy_continue
from hf_subtok.bench.evaluate import run_methods
from hf_subtok.bench.intervals import compare, wilson
from hf_subtok.bench.needle import SETTINGS
from hf_subtok.bench.prefill import dense_prefill
from hf_subtok.bench.report import DASH, _budget_cell, _methods_in_order, _ratio_cell, _row, _tokens
from hf_subtok.bench.ruler import FAMILIES, build_ruler_case
from hf_subtok.tasks import as_input_ids

SUMMARY_FIELDS = ("family", "setting", "context", "method", "label", "budget", "bits", "ratio", "cases", "correct",
                  "score", "ci_low", "ci_high", "status")


@dataclass(frozen=True)
class RulerSpec:
    family: str
    length: int
    index: int
    seed: int
    max_new: int | None = None  # BenchConfig.ruler_max_new_tokens

    @property
    def key(self) -> str:
        return f"ruler|{self.family}|{self.length}|{self.index}|{self.seed}" + (f"|max{self.max_new}" if self.max_new else "")


def ruler_specs(config) -> list[RulerSpec]:
    return [
        RulerSpec(family, length, index, config.ruler_seed, config.ruler_max_new_tokens)
        for length in config.ruler_contexts
        for family in config.ruler_families
        for index in range(config.ruler_cases)
    ]


def units(config, n_methods: int) -> int:
    """Progress units of this suite: one per (case, setting, method)."""
    return len(ruler_specs(config)) * len(SETTINGS) * n_methods


def grid_keys(config, rid: str) -> list[str]:
    """Keys of every row this suite produces, in table order."""
    return [f"{rid}|{spec.key}|{setting}|{m.name}" for spec in ruler_specs(config) for setting in SETTINGS
            for m in config.methods]


def run_ruler(ctx) -> None:
    for spec in ruler_specs(ctx.config):
        prefixes = {s: f"{spec.key}|{s}" for s in SETTINGS}
        if ctx.all_done(prefixes.values()):
            ctx.advance(len(SETTINGS) * len(ctx.methods))
            continue
        _run_case(ctx, spec, prefixes)


def _run_case(ctx, spec: RulerSpec, prefixes: dict[str, str]) -> None:
    case = build_ruler_case(ctx.tokenizer, spec.family, spec.length, spec.index, spec.seed)
    prompt, context, question = (as_input_ids(ids) for ids in (case.prompt_ids, case.context_ids, case.question_ids))
    stop_ids = eos_ids(ctx.model)
    max_new = spec.max_new or case.max_new_tokens
    base = {"suite": "ruler", "task": spec.family, "context_tokens": spec.length, "prompt_tokens": prompt.shape[1],
            "case_index": spec.index, "seed": spec.seed, "expected": list(case.expected), "metric": case.metric}

    def stop(tokens):
        return case.score(ctx.tokenizer.decode(tokens, skip_special_tokens=True)) == 1.0

    for setting, ids in (("in_prompt", prompt), ("after", context)):
        if ctx.all_done([prefixes[setting]]):
            ctx.advance(len(ctx.methods))
            continue
        where = f"ruler {spec.family} {spec.length} tok #{spec.index}, {setting}"
        ctx.set_status(f"{where}: dense prefill")
        prefill = dense_prefill(ctx.model, ids, capture_hidden=ctx.needs_hidden)
        ctx.maybe_verify_presses(setting, ids, prefill)

        def evaluate(compressed, setting=setting, prefill=prefill):
            if setting == "in_prompt":
                gen = greedy_continue(ctx.model, compressed.cache, prompt.shape[1], first_logits=compressed.logits_after(prefill),
                                      max_new_tokens=max_new, stop_ids=stop_ids, stop=stop)
            else:
                gen = greedy_continue(ctx.model, compressed.cache, context.shape[1], input_ids=question,
                                      max_new_tokens=max_new, stop_ids=stop_ids, stop=stop)
            answer = ctx.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
            score = case.score(answer)
            return {"answer": answer, "score": score, "correct": score == 1.0, "new_tokens": len(gen.token_ids),
                    "decode_s": gen.seconds}

        ctx.set_status(f"{where}: methods")
        row_base = {**base, "setting": setting, "setting_description": SETTINGS[setting], "prefill_s": prefill.seconds}
        run_methods(ctx, prefill, row_base, prefixes[setting], evaluate, ids)
        del prefill


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (family, setting, context, method), plus family `all` (every case pooled).

    `score` is the mean RULER score over the cases, `correct` how many scored 1, `ci_low` and
    `ci_high` its 95% Wilson interval; a method that could not run has `cases` 0 and its status.
    """
    ruler = [r for r in rows if r.get("suite") == "ruler"]
    out = []
    for setting in SETTINGS:
        for context in sorted({r["context_tokens"] for r in ruler}):
            at = [r for r in ruler if r["setting"] == setting and r["context_tokens"] == context]
            families = [f for f in FAMILIES if any(r["task"] == f for r in at)]
            for method, first in _methods_in_order(at):
                mine = [r for r in at if r["method"] == method]
                for family in [*families, "all"]:
                    group = [r for r in mine if family in ("all", r["task"])]
                    if group:
                        out.append(_summary_row(family, setting, context, method, first, group))
    return out


def _summary_row(family, setting, context, method, first, group) -> dict:
    ok = [r for r in group if r.get("status") == "ok"]
    row = {"family": family, "setting": setting, "context": context, "method": method, "label": first.get("label"),
           "budget": first.get("budget"), "bits": first.get("bits"), "cases": len(ok),
           "status": "ok" if ok else next(r.get("status") for r in group)}
    if ok:
        total = sum(r["score"] for r in ok)
        low, high = wilson(total, len(ok))
        row.update(ratio=sum(r["ratio"] for r in ok) / len(ok), correct=sum(bool(r["correct"]) for r in ok),
                   score=total / len(ok), ci_low=low, ci_high=high)
    return row


def markdown_tables(rows: list[dict]) -> list[str]:
    """Per setting: one line per (method, context), mean score per family and pooled with its CI."""
    summary = summarize(rows)
    if not summary:
        return []
    ruler = [r for r in rows if r.get("suite") == "ruler"]
    families = [f for f in FAMILIES if any(r["task"] == f for r in ruler)]
    cell = {(s["setting"], s["context"], s["method"], s["family"]): s for s in summary}
    out = []
    for setting, description in SETTINGS.items():
        subset = [r for r in ruler if r["setting"] == setting]
        if not subset:
            continue
        header = ["method", "budget", "stored/dense", "context", *families, "all (95% CI)", "vs dense"]
        lines = [f"### ruler: {description}", "", _row(header), _row(["---"] * len(header))]
        for context in sorted({r["context_tokens"] for r in subset}):
            for method, first in _methods_in_order([r for r in subset if r["context_tokens"] == context]):
                mine = [r for r in subset if r["method"] == method and r["context_tokens"] == context]
                cells = [method, _budget_cell(first), _ratio_cell(mine), _tokens(context)]
                for family in [*families, "all"]:
                    s = cell.get((setting, context, method, family))
                    if s is None or not s["cases"]:
                        cells.append(DASH)
                    elif family == "all":
                        cells.append(f"{s['score']:.2f} ({s['ci_low']:.2f}-{s['ci_high']:.2f})")
                    else:
                        cells.append(f"{s['score']:.2f}")
                mine_all, dense_all = cell.get((setting, context, method, "all")), cell.get((setting, context, "dense", "all"))
                versus = DASH
                if method != "dense" and mine_all and dense_all and mine_all["cases"] and dense_all["cases"]:
                    versus = compare(mine_all["score"] * mine_all["cases"], mine_all["cases"],
                                     dense_all["score"] * dense_all["cases"], dense_all["cases"])
                lines.append(_row([*cells, versus]))
        cases = sorted({s["cases"] for s in summary if s["family"] != "all" and s["cases"]})
        lines += ["", f"Mean RULER score per family over {'/'.join(map(str, cases)) or 0} case(s) each "
                  "(string_match_all; qa: string_match_part); all: every case pooled, 95% Wilson interval; vs dense: "
                  "whether that interval lies above or below dense's, or overlaps it (then these cases do not rank them)."]
        out.append("\n".join(lines))
    return out


def write_summary(out_dir: str | Path, rows: list[dict]) -> dict[str, str]:
    """Write `ruler_summary.csv` and `ruler_summary.json` (the `summarize` rows); their paths."""
    summary = summarize(rows)
    paths = {"ruler_csv": str(Path(out_dir) / "ruler_summary.csv"), "ruler_json": str(Path(out_dir) / "ruler_summary.json")}
    with open(paths["ruler_csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows({k: row.get(k) for k in SUMMARY_FIELDS} for row in summary)
    Path(paths["ruler_json"]).write_text(json.dumps(summary, indent=1))
    return paths

