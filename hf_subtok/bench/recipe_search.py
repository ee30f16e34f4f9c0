"""`hf-subtok recipes`: measure candidate recipes at each budget and write the table that
`SubTokenConfig(budget=b)` alone reads (`hf_subtok.recipes`).

Every candidate of `CANDIDATES` runs at every budget on the needle (question inside the
compressed prompt, and withheld until after compression) and on perplexity after a
compressed prefix of two shipped texts of different kinds (the book and the legal text), in
one benchmark run per text with the model in the table's dtype; with `ruler_contexts`, also on
the RULER-style families (`bench.ruler`, both settings), whose texts and questions the needle
never saw. `choose` then takes, per budget, the recipe that is good everywhere rather than best
at one table:

1. accuracy: needle cases answered over both settings, pooled (and, when RULER ran, the RULER
   score pooled over families and settings, partial credit counted as RULER counts it);
2. contenders: the candidates whose needle accuracy lies inside the 95% Wilson interval of the
   best needle accuracy, and whose RULER score lies inside that of the best RULER score;
3. among them, the smallest worst perplexity change over both texts and every prefix (then
   the fewest stored bytes).

With `layer_policy`, each budget's chosen candidate is then the start of a search for a policy
per band of layers (`layer_policy.search_policy`, on held-out text); what it finds runs as one
more candidate, `<chosen>+layers`, on the same cases, and the rule above chooses again. The two
rows side by side are the ablation: one policy for every layer against a policy per band.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hf_subtok.bench.intervals import wilson
from hf_subtok.bench.methods import MethodSpec
from hf_subtok.recipes import RECIPE_FIELDS, TABLE_DTYPES, Recipe, parse_table

logger = logging.getLogger(__name__)

_ALL_AXES = {"bits": "auto", "num_groups": 2, "window": 16, "pack_chunk": 8}
# name -> fields; a field left out keeps `SubTokenConfig`'s default
CANDIDATES: dict[str, dict] = {
    # token eviction alone, in the model's dtype: what `budget=` gave before the table
    "tokens": {},
    # tokens (SnapKV per head), two value groups, each layer's plan picking full, 8, 4 or 2 bits
    "all-axes": dict(_ALL_AXES),
    # the same, quantized tokens Hadamard-rotated
    "all-axes-rotated": {**_ALL_AXES, "rotate": True},
    # every survivor in 4 bits, Hadamard-rotated
    "all-axes-4bit-rotated": {**_ALL_AXES, "bits": 4, "rotate": True},
    # every survivor in 2 bits, Hadamard-rotated (keys per channel, values over their least-error range)
    "all-axes-2bit-rotated": {**_ALL_AXES, "bits": 2, "rotate": True},
    # the same but 4 bits in the first quarter of the layers, whose errors every later layer reads
    "all-axes-2bit-early4-rotated": {**_ALL_AXES, "bits": 2, "rotate": True,
                                     "overrides": [{"layers": "0-25%", "bits": 4}]},
}
TEXTS = ("ppl", "legal")  # the book, and legal prose of another kind and century


@dataclass
class Measured:
    """What one candidate measured at one budget."""

    candidate: str
    budget: float
    needle: dict  # setting -> [correct, cases]
    ppl_change: dict  # "text@prefix" -> relative change against dense (0.01 = +1%)
    ratio: float  # stored / dense bytes, mean over the cases
    ruler: dict = field(default_factory=dict)  # setting -> [score sum, cases] (RULER, when it ran)

    @property
    def correct(self) -> int:
        return sum(c for c, _ in self.needle.values())

    @property
    def cases(self) -> int:
        return sum(n for _, n in self.needle.values())

    @property
    def accuracy(self) -> float:
        return self.correct / self.cases if self.cases else 0.0

    @property
    def ruler_cases(self) -> int:
        return sum(n for _, n in self.ruler.values())

    @property
    def ruler_score(self) -> float:
        """Mean RULER score over every family and setting (0 when RULER did not run)."""
        return sum(s for s, _ in self.ruler.values()) / self.ruler_cases if self.ruler_cases else 0.0

    @property
    def worst_ppl_change(self) -> float:
        return max(self.ppl_change.values()) if self.ppl_change else float("inf")


def candidate_specs(catalog: dict[float, dict[str, dict]]) -> list[MethodSpec]:
    """dense, then at each budget every candidate of `catalog[budget]` (name -> fields), each
    with `recipe=None` (fields as written)."""
    specs = [MethodSpec("dense")]
    for budget, candidates in catalog.items():
        for name, fields in candidates.items():
            unknown = sorted(set(fields) - set(RECIPE_FIELDS))
            if unknown:
                raise ValueError(f"candidate {name!r} sets fields that are not recipe fields: {unknown}")
            options = tuple(sorted({**fields, "recipe": None}.items()))
            specs.append(MethodSpec("subtok", budget, variant=name, options=options))
    return specs


def summarize(rows: list[dict]) -> list[Measured]:
    """One `Measured` per (candidate, budget) from benchmark rows (needle, ppl of any text, RULER).

    A candidate that failed or could not reach a budget in any case is left out."""
    dense = {
        (r["text"], r["prefix_tokens"]): r["ppl"]
        for r in rows
        if r.get("suite") == "ppl" and r["method"] == "dense" and r.get("status") == "ok"
    }
    mine: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        if r["family"] == "subtok" and r.get("suite") in ("needle", "ppl", "ruler"):
            mine.setdefault((r["variant"], r["budget"]), []).append(r)
    out = []
    for (candidate, budget), group in mine.items():
        if any(r.get("status") != "ok" for r in group):
            reasons = {r.get("reason") for r in group if r.get("status") != "ok"}
            logger.warning("candidate %s at %s left out: %s", candidate, budget, "; ".join(map(str, reasons)))
            continue
        needle: dict[str, list[int]] = {}
        ruler: dict[str, list[float]] = {}
        ppl_change = {}
        for r in group:
            if r["suite"] == "needle":
                tally = needle.setdefault(r["setting"], [0, 0])
                tally[0] += int(r["correct"])
                tally[1] += 1
            elif r["suite"] == "ruler":
                tally = ruler.setdefault(r["setting"], [0.0, 0])
                tally[0] += float(r["score"])
                tally[1] += 1
            else:
                base = dense[(r["text"], r["prefix_tokens"])]
                ppl_change[f"{r['text']}@{r['prefix_tokens']}"] = r["ppl"] / base - 1
        ratio = sum(r["ratio"] for r in group) / len(group)
        out.append(Measured(candidate, budget, needle, ppl_change, ratio, ruler))
    return out


def choose(measured: list[Measured]) -> dict[float, Measured]:
    """Per budget, the candidate kept by the rule of this module's docstring."""
    by_budget: dict[float, list[Measured]] = {}
    for m in measured:
        by_budget.setdefault(m.budget, []).append(m)
    chosen = {}
    for budget, group in sorted(by_budget.items()):
        best = max(group, key=lambda m: m.accuracy)
        low, _ = wilson(best.correct, best.cases)
        contenders = [m for m in group if m.accuracy >= low]
        scored = [m for m in contenders if m.ruler_cases]
        if scored:  # RULER ran: its families must not rank a contender out either
            best_ruler = max(scored, key=lambda m: m.ruler_score)
            ruler_low, _ = wilson(best_ruler.ruler_score * best_ruler.ruler_cases, best_ruler.ruler_cases)
            contenders = [m for m in scored if m.ruler_score >= ruler_low]
        chosen[budget] = min(contenders, key=lambda m: (m.worst_ppl_change, m.ratio))
    return chosen


def table_rows(chosen: dict[float, Measured], dtype: str, catalog: dict | None = None) -> list[Recipe]:
    """The table rows of `dtype` for the chosen candidates (`catalog[budget][name]`: their
    fields, as `run_search` returns it; `CANDIDATES` at budgets it lacks)."""
    catalog = catalog or {}
    rows = []
    for budget, m in sorted(chosen.items()):
        low, high = wilson(m.correct, m.cases)
        measured = {
            "ratio": round(m.ratio, 4),
            "needle": {setting: list(tally) for setting, tally in m.needle.items()},
            "needle_accuracy": [round(m.accuracy, 4), round(low, 4), round(high, 4)],
            "ppl_change": {k: round(v, 4) for k, v in m.ppl_change.items()},
        }
        if m.ruler_cases:
            ruler_low, ruler_high = wilson(m.ruler_score * m.ruler_cases, m.ruler_cases)
            measured["ruler"] = {setting: [round(total, 4), n] for setting, (total, n) in m.ruler.items()}
            measured["ruler_score"] = [round(m.ruler_score, 4), round(ruler_low, 4), round(ruler_high, 4)]
        fields = catalog.get(budget, CANDIDATES)[m.candidate]
        rows.append(Recipe(dtype, budget, m.candidate, dict(fields), measured))
    return rows


def write_table(path: str | Path, dtype: str, rows: list[Recipe], generated: dict) -> dict:
    """Replace `dtype`'s rows (and how they were generated) in the table file at `path`, keeping
    the other dtypes' rows; the file is replaced in one move. Returns the new table's JSON."""
    if dtype not in TABLE_DTYPES:
        raise ValueError(f"dtype must be one of {TABLE_DTYPES}, got {dtype!r}")
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"generated": {}, "recipes": {}}
    data["generated"][dtype] = generated
    data["recipes"][dtype] = [
        {"budget": r.budget, "candidate": r.candidate, "fields": r.fields, "measured": r.measured} for r in rows
    ]
    parse_table(data)  # every row must build a valid config before the file is touched
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return data


def table_markdown(table: dict) -> str:
    """The table as Markdown: dtype, budget, recipe, fields and what it measured."""
    lines = [
        "| model dtype | budget | recipe | fields | stored / dense | needle in prompt | needle withheld | "
        "needle both (95% CI) | RULER score (95% CI) | ppl Δ, worst text |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype, rows in table["recipes"].items():
        for r in rows:
            m = r.measured
            fields = ", ".join(f"{k}={v}" for k, v in r.fields.items()) or "defaults (full precision)"
            acc, low, high = m["needle_accuracy"]
            cells = [dtype, f"{r.budget:g}", r.candidate, fields, f"{m['ratio']:.3f}",
                     _tally(m["needle"].get("in_prompt")), _tally(m["needle"].get("after")),
                     f"{acc:.2f} ({low:.2f}-{high:.2f})", _ruler_cell(m), f"{100 * max(m['ppl_change'].values()):+.1f}%"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def candidates_markdown(measured: list[Measured], chosen: dict[float, Measured]) -> str:
    """Every candidate at every budget, the chosen ones in bold: what the choice was made from."""
    keys = sorted({k for m in measured for k in m.ppl_change})
    ruler = any(m.ruler_cases for m in measured)
    lines = [
        "| budget | candidate | stored / dense | needle in prompt | needle withheld | needle both (95% CI) | "
        + ("RULER score (95% CI) | " if ruler else "") + " | ".join(f"ppl Δ {k}" for k in keys) + " |",
        "|---:|---|---:|---:|---:|---:|" + ("---:|" if ruler else "") + "---:|" * len(keys),
    ]
    for m in sorted(measured, key=lambda m: (-m.budget, m.candidate)):
        low, high = wilson(m.correct, m.cases)
        name = f"**{m.candidate}**" if chosen.get(m.budget) is m else m.candidate
        cells = [f"{m.budget:g}", name, f"{m.ratio:.3f}", _tally(m.needle.get("in_prompt")),
                 _tally(m.needle.get("after")), f"{m.accuracy:.2f} ({low:.2f}-{high:.2f})"]
        if ruler:
            cells.append(_score(m.ruler_score, m.ruler_cases))
        cells += [f"{100 * m.ppl_change[k]:+.1f}%" if k in m.ppl_change else "-" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tally(pair) -> str:
    return "-" if not pair else f"{pair[0]}/{pair[1]}"


def _ruler_cell(measured: dict) -> str:
    """A table row's RULER score (95% CI) and cases, '-' for a row measured without RULER."""
    return _score(measured["ruler_score"][0], sum(n for _, n in measured["ruler"].values())) if "ruler" in measured else "-"


def _score(mean: float, cases: int) -> str:
    """A mean score with its 95% interval and cases, or '-' without cases."""
    if not cases:
        return "-"
    low, high = wilson(mean * cases, cases)
    return f"{mean:.2f} ({low:.2f}-{high:.2f}), n={cases}"


def generated_by(command: str, model_fingerprint: dict, grid: dict) -> dict:
    """How a table was made: command, commit, date, model, grid."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {"command": command, "commit": commit, "date": datetime.date.today().isoformat(),
            "model": model_fingerprint.get("name_or_path"), "grid": grid}


def run_search(
    *,
    dtype: str,
    budgets: list[float],
    out_dir: str | Path,
    needle_lengths: list[int],
    needle_depths: list[float],
    needle_seeds: list[int],
    ppl_prefixes: list[int],
    ppl_eval_tokens: int = 512,
    ruler_contexts: list[int] = (),
    ruler_cases: int = 2,
    ruler_families: list[str] | None = None,
    candidates: dict[str, dict] | None = None,
    layer_policy: bool = False,
    policy_options: dict | None = None,
    model=None,
    tokenizer=None,
    model_name: str | None = None,
    restart: bool = False,
) -> tuple[list[Measured], dict, dict]:
    """Run every candidate at every budget (one benchmark run per text, resumable in
    `out_dir/<text>`; with `ruler_contexts`, the RULER-style families at those lengths,
    `ruler_cases` per family, context and setting, in `out_dir/ruler`); with `layer_policy`, then search a policy per band of layers from each
    budget's chosen candidate (`layer_policy.search_policy`, on held-out text; saved in
    `out_dir/layer_policy.json`) and run those as candidates too (`policy_options`: keyword
    arguments of `search_policy`, e.g. `bands`).

    Returns `(summaries, model fingerprint, catalog)`: `catalog[budget][name]` is the fields of
    every candidate that ran at `budget` (the per-layer ones named `<base>+layers`).
    """
    import torch

    from hf_subtok.model_loading import load_model_and_tokenizer, model_fingerprint

    if model is None:
        model, tokenizer = load_model_and_tokenizer(model_name, dtype=getattr(torch, dtype))
    candidates = CANDIDATES if candidates is None else candidates
    catalog = {budget: dict(candidates) for budget in budgets}
    grid = dict(needle_lengths=needle_lengths, needle_depths=needle_depths, needle_seeds=needle_seeds,
                ppl_prefixes=ppl_prefixes, ppl_eval_tokens=ppl_eval_tokens, ruler_contexts=list(ruler_contexts),
                ruler_cases=ruler_cases, ruler_families=ruler_families)
    measured = _run_candidates(catalog, model, tokenizer, out_dir, model_name, dtype, restart, grid)
    if layer_policy:
        policies = _layer_policies(choose(measured), catalog, model, tokenizer, Path(out_dir) / "layer_policy.json",
                                   policy_options or {})
        for budget, (base, fields) in policies.items():
            catalog[budget][f"{base}+layers"] = fields
        if policies:  # the rows measured so far are read back, not run again
            measured = _run_candidates(catalog, model, tokenizer, out_dir, model_name, dtype, False, grid)
    return measured, model_fingerprint(model), catalog


def _run_candidates(catalog, model, tokenizer, out_dir, model_name, dtype, restart, grid) -> list[Measured]:
    from hf_subtok.bench.runner import BenchConfig, run_bench

    specs = candidate_specs(catalog)
    rows = []
    for text in TEXTS:
        config = BenchConfig(
            suites=["needle", "ppl"] if text == TEXTS[0] else ["ppl"],
            methods=specs,
            budgets=list(catalog),
            needle_lengths=list(grid["needle_lengths"]),
            needle_depths=list(grid["needle_depths"]),
            needle_seeds=list(grid["needle_seeds"]),
            ppl_prefix_lengths=list(grid["ppl_prefixes"]),
            ppl_eval_tokens=grid["ppl_eval_tokens"],
            ppl_text=text,
            out_dir=str(Path(out_dir) / text),
            model=model_name,
            dtype=dtype,
            restart=restart,
        )
        rows += run_bench(config, model, tokenizer)["rows"]
    if grid["ruler_contexts"]:
        families = {} if grid["ruler_families"] is None else {"ruler_families": list(grid["ruler_families"])}
        config = BenchConfig(
            suites=["ruler"], methods=specs, budgets=list(catalog), ruler_contexts=list(grid["ruler_contexts"]),
            ruler_cases=grid["ruler_cases"], **families, out_dir=str(Path(out_dir) / "ruler"), model=model_name,
            dtype=dtype, restart=restart,
        )
        rows += run_bench(config, model, tokenizer)["rows"]
    return summarize(rows)


def _layer_policies(chosen: dict[float, Measured], catalog, model, tokenizer, path: Path, options: dict) -> dict:
    """Per budget, `(base candidate, its fields with the overrides found)` where the search found
    any; every result is saved to `path` and read back from it when its base is unchanged."""
    from hf_subtok.bench.layer_policy import search_policy
    from hf_subtok.bench.resume import code_fingerprint
    from hf_subtok.model_loading import model_fingerprint

    made_by = {"code": code_fingerprint(), "model": model_fingerprint(model)}
    saved = json.loads(path.read_text()) if path.exists() else {}
    out = {}
    for budget, m in chosen.items():
        fields = catalog[budget][m.candidate]
        key = f"{budget:g}"
        settings = {"base": m.candidate, "fields": fields, "options": options, **made_by}
        if {k: saved.get(key, {}).get(k) for k in settings} != settings:
            result = search_policy(model, tokenizer, fields, budget, **options)
            saved[key] = {**settings, **result.to_dict()}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(saved, indent=1) + "\n")
        found = saved[key]["overrides"]
        logger.info("layer policy at %s from %s: %s", budget, m.candidate, found or "none beat the one policy")
        if found:
            out[budget] = (m.candidate, {**fields, "overrides": [*fields.get("overrides", []), *found]})
    return out
