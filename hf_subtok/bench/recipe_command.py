"""The `hf-subtok recipes` subcommand: show the budget -> recipe table, or measure it again."""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

logger = logging.getLogger("hf_subtok.cli")

DEFAULT_BUDGETS = "0.25,0.125,0.1"  # the presets' budgets
# 2k tokens: far enough above floor_tokens (128, 6.25% of the context) that 10% is the budget's
DEFAULT_LENGTHS = "2k"
DEFAULT_SEEDS = "0,1,2,3"  # with three depths: 12 cases per setting, 24 pooled
DEFAULT_PREFIXES = "2k,4k"


def add_recipes_parser(subparsers) -> argparse.ArgumentParser:
    """Add `recipes` to the `hf-subtok` subcommands."""
    p = subparsers.add_parser(
        "recipes",
        help="show the budget -> recipe table that budget= alone reads, or measure it again (--search)",
    )
    p.add_argument("--search", action="store_true", help="run the candidates and choose (else: show the table)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the table to measure: the model runs in this dtype (default float32)")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help=f"table rows (default {DEFAULT_BUDGETS})")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"needle context lengths (default {DEFAULT_LENGTHS})")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths (default 0.1,0.5,0.9)")
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"needle seeds (default {DEFAULT_SEEDS})")
    p.add_argument("--ppl-prefix", default=DEFAULT_PREFIXES,
                   help=f"perplexity prefix lengths, on each text (default {DEFAULT_PREFIXES})")
    p.add_argument("--ppl-tokens", type=int, default=512, help="tokens scored after each prefix (default 512)")
    p.add_argument("--out", default="bench_out/recipes", help="benchmark output folder (resumable)")
    p.add_argument("--table", default=None,
                   help="table file to write (default: the package's hf_subtok/data/recipes.json)")
    p.add_argument("--model", default=None, help="model id or folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--layer-policy", action="store_true",
                   help="then search a policy per band of layers from each budget's chosen candidate (token "
                   "scorer, precision, share of the budget; on held-out text) and run it as a candidate too")
    p.add_argument("--ruler-contexts", default="",
                   help="also run the RULER-style families at these lengths, e.g. 4k, and choose by them too (default: none)")
    p.add_argument("--ruler-cases", type=int, default=2, help="RULER cases per family, length and setting (default 2)")
    p.add_argument("--restart", action="store_true", help="ignore finished cases in --out")
    return p


def run_recipes(args, argv: list[str]) -> str:
    """The table as Markdown; with `--search`, measured again and written first."""
    from hf_subtok import recipes
    from hf_subtok.bench.methods import parse_budgets, parse_depths, parse_ints
    from hf_subtok.bench.recipe_search import (
        candidates_markdown,
        choose,
        generated_by,
        run_search,
        table_markdown,
        table_rows,
        write_table,
    )

    path = Path(args.table) if args.table else recipes.table_path()
    if args.search:
        grid = {
            "budgets": parse_budgets(args.budgets),
            "needle_lengths": parse_ints("lengths", args.lengths, low=64),
            "needle_depths": parse_depths(args.depths),
            "needle_seeds": parse_ints("seeds", args.seeds, low=0),
            "ppl_prefixes": parse_ints("ppl-prefix", args.ppl_prefix, low=64),
            "ppl_eval_tokens": args.ppl_tokens,
            "ruler_contexts": parse_ints("ruler-contexts", args.ruler_contexts, low=64) if args.ruler_contexts else [],
            "ruler_cases": args.ruler_cases,
        }
        measured, fingerprint, catalog = run_search(dtype=args.dtype, out_dir=args.out, model_name=args.model,
                                                    restart=args.restart, layer_policy=args.layer_policy, **grid)
        chosen = choose(measured)
        if not chosen:
            raise ValueError("no candidate ran at any budget; see the log")
        rows = table_rows(chosen, args.dtype, catalog)
        command = "hf-subtok " + shlex.join(argv)
        data = write_table(path, args.dtype, rows, generated_by(command, fingerprint, grid))
        logger.info("wrote %s", path)
        table = recipes.parse_table(data)
        recipes.load_table.cache_clear()
        searched = f"Every candidate ({args.dtype}; chosen in bold):\n\n{candidates_markdown(measured, chosen)}\n\n"
        per_layer = [f"- {budget:g}, {name}: {fields['overrides']}" for budget, group in catalog.items()
                     for name, fields in group.items() if name.endswith("+layers")]
        if per_layer:
            searched += "Policies per band of layers:\n" + "\n".join(per_layer) + "\n\n"
    else:
        searched = ""
        table = recipes.read_table(path)
    commands = "\n".join(
        f"- {dtype}: `{g.get('command')}` (commit {g.get('commit')}, {g.get('date')}, {g.get('model')})"
        for dtype, g in table["generated"].items()
    )
    return f"{searched}{table_markdown(table)}\n\nMeasured by:\n{commands}"
