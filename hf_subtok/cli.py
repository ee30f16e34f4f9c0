"""The `hf-subtok` command line: `demo`, `generate`, `bench`, `train-router` and `calibrate`.

Results go to stdout; progress and logs to stderr. A usage error, a bad model path, or a
bad configuration value prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

logger = logging.getLogger("hf_subtok.cli")

EXIT_USAGE = 2


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2."""

    def error(self, message: str):
        raise CliError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    from hf_subtok.bench.runner import DEFAULT_BUDGETS, DTYPES, QUICK_BUDGETS, SUITES
    from hf_subtok.model_classes import ARCHITECTURES

    parser = _Parser(prog="hf-subtok", description="Sub-token KV-cache compression for transformers' generate().")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's choice; 1 avoids spin-wait stalls on a busy shared machine)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser("demo", help="answer one long-context question with a dense and a compressed cache")
    demo.add_argument("--model", default=None, help="model id or folder (default: embedded SmolLM2-135M-Instruct)")
    demo.add_argument("--context-tokens", type=int, default=None, help="prompt length (default 3000)")

    gen = sub.add_parser("generate", help="generate with a chosen SubTokenCache configuration")
    gen.add_argument("--model", default=None, help="model id or folder (default: embedded SmolLM2-135M-Instruct)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--file", help="read the prompt from this file")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    add_config_options(gen)

    bench = sub.add_parser("bench", help="quality, memory and speed against dense and kvpress")
    bench.add_argument("--suite", default=",".join(SUITES),
                       help=f"comma list of {', '.join(SUITES)} (default: all), or ruler (RULER-style families), "
                       "memory and throughput (each method in fresh processes), when named")
    bench.add_argument(
        "--methods", default=None,
        help="comma list (default dense,subtok,kvpress; for memory/throughput alone: dense, the presets, the best "
        "kvpress press at balanced's bytes, 4- and 2-bit quanto): dense, subtok[@B], subtok:KEY=VALUE[+KEY=VALUE...][@B] (any SubTokenConfig field) or "
        "subtok:PRESET[@B], kvpress[:NAME][@B] (needs kvpress), quantized[:quanto|hqq][@BITS] (transformers' "
        "QuantizedCache, 4 and 2 bits by default; needs hf-subtok[quant]); prefill_chunk=N in a subtok variant, or "
        "dense:prefill_chunk=N, feeds the prompt N tokens per forward (chunked prefill)",
    )
    bench.add_argument(
        "--budgets", default=None, help=f"comma list in (0, 1] (default {','.join(map(str, DEFAULT_BUDGETS))}; --quick: "
        f"{','.join(map(str, QUICK_BUDGETS))})",
    )
    bench.add_argument("--lengths", default=None, help="needle context lengths, e.g. 1k,2k,4k,8k")
    bench.add_argument("--depths", default=None, help="needle depths in [0, 1], e.g. 0.1,0.5,0.9")
    bench.add_argument("--seeds", default=None, help="needle pass-key seeds, e.g. 0,1")
    bench.add_argument("--ppl-prefix", default=None, help="ppl prefix lengths, e.g. 4k")
    bench.add_argument("--speed-lengths", default=None, help="speed context lengths, e.g. 1k,4k")
    bench.add_argument("--ppl-text", default=None, help="ppl text: ppl or book (default), legal, or a file path")
    bench.add_argument("--contexts", default=None, help="ruler context lengths (default 2k,4k,8k; --quick: 1k)")
    bench.add_argument("--cases", type=int, default=None, help="ruler cases per family and length (default 5)")
    bench.add_argument("--families", default=None, help="ruler families (default all: niah_single, niah_multikey, "
                       "niah_multivalue, niah_multiquery, vt, cwe, fwe, qa)")
    bench.add_argument("--memory-contexts", default=None,
                       help="memory/throughput context lengths at batch 1 (default 2k,4k,8k; --quick: 1k)")
    bench.add_argument("--batch", default=None,
                       help="memory/throughput batch case ROWSxTOKENS, or none (default 8x2k; --quick: 2x512)")
    bench.add_argument("--repeats", type=int, default=None,
                       help="memory/throughput fresh processes per case and method, medians reported (default 3; --quick: 1)")
    bench.add_argument("--device", default="cpu", help="memory/throughput: cpu or cuda (default cpu)")
    bench.add_argument("--window", type=int, default=None, help="subtok dense window (default: the config's or its recipe's)")
    bench.add_argument("--quick", action="store_true", help="a small grid that runs in a couple of minutes")
    bench.add_argument("--out", default="bench_out", help="output folder (JSONL, JSON, Markdown, PNG)")
    bench.add_argument("--restart", action="store_true", help="ignore finished cases in --out instead of resuming")
    bench.add_argument("--model", default=None, help="model id or folder (default: embedded SmolLM2-135M-Instruct)")
    bench.add_argument(
        "--architecture", default=None, choices=ARCHITECTURES,
        help="run a Llama checkpoint's weights in this model class (same math; default: the checkpoint's own class)",
    )
    bench.add_argument(
        "--dtype", default="float32", choices=DTYPES,
        help="dtype the model runs in; every stored/dense ratio is against the dense cache in it (default float32)",
    )
    from hf_subtok.training.command import add_parser as add_train_router

    add_train_router(sub)
    from hf_subtok.rank.command import add_calibrate_parser

    add_calibrate_parser(sub)
    from hf_subtok.bench.recipe_command import add_recipes_parser

    add_recipes_parser(sub)
    from hf_subtok.bench.scoreboard import add_scoreboard_parser

    add_scoreboard_parser(sub)
    return parser


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """`--preset` and one option per `SubTokenConfig` field (`--bits`, `--token-scorer`, ...).

    The options come from the dataclass (names, types, help), so a field added to the config is
    an option without touching this file. An option the user does not give is absent from the
    parsed arguments (`config_from_args` then keeps the preset's value or the default).
    """
    import dataclasses

    from hf_subtok.bench.overrides import field_types
    from hf_subtok.config import SubTokenConfig
    from hf_subtok.presets import PRESETS

    group = parser.add_argument_group(
        "cache configuration", "SubTokenConfig fields; the ones given override the preset's"
    )
    group.add_argument(
        "--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
        help="start from this named configuration (hf_subtok.presets)",
    )
    types = field_types(SubTokenConfig)
    for f in dataclasses.fields(SubTokenConfig):
        if not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "").replace("%", "%%")
        if types[f.name] is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=_field_parser(f.name, types[f.name]),
                               default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def _field_parser(name: str, tp):
    """An argparse `type` converting the text to the field's type (`none` for optional fields)."""
    from hf_subtok.bench.overrides import convert

    def parse(text: str):
        try:
            return convert(name, text, tp, what="")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).strip()) from None

    return parse


def config_from_args(args):
    """The `SubTokenConfig` of `--preset` and the given field options (they win over the preset)."""
    import dataclasses

    from hf_subtok.config import SubTokenConfig
    from hf_subtok.presets import PRESETS

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SubTokenConfig) if hasattr(args, f.name)}
    preset = getattr(args, "preset", None)
    return SubTokenConfig(**{**(PRESETS[preset] if preset else {}), **given})


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.INFO if verbose < 2 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose < 1 and not quiet:
        # transformers and friends are chatty at INFO; keep our own progress lines only
        for name in ("transformers", "httpx", "urllib3", "filelock"):
            logging.getLogger(name).setLevel(logging.WARNING)


def bench_config_from_args(args) -> object:
    """A validated `BenchConfig` from `bench` arguments (raises ValueError on bad values)."""
    from hf_subtok.bench.methods import (
        parse_budgets,
        parse_depths,
        parse_ints,
        parse_methods,
        parse_suites,
    )
    from hf_subtok.bench.runner import (
        DEFAULT_BUDGETS,
        OPTIONAL_SUITES,
        QUICK_BUDGETS,
        SUITES,
        BenchConfig,
    )
    from hf_subtok.bench.throughput import parse_batch

    if args.budgets:
        budgets = parse_budgets(args.budgets)
    else:
        budgets = list(QUICK_BUDGETS if args.quick else DEFAULT_BUDGETS)
    suites = parse_suites(args.suite, SUITES + OPTIONAL_SUITES)
    overrides = {
        "suites": suites,
        "budgets": budgets,
        "methods": parse_methods(bench_methods(args.methods, suites), budgets),
        "device": args.device,
        "window": _non_negative("window", args.window),
        "out_dir": args.out,
        "model": args.model,
        "architecture": args.architecture,
        "dtype": args.dtype,
        "restart": args.restart,
    }
    if args.lengths:
        overrides["needle_lengths"] = parse_ints("lengths", args.lengths, low=64)
    if args.depths:
        overrides["needle_depths"] = parse_depths(args.depths)
    if args.seeds:
        overrides["needle_seeds"] = parse_ints("seeds", args.seeds, low=0)
    if args.ppl_prefix:
        overrides["ppl_prefix_lengths"] = parse_ints("ppl-prefix", args.ppl_prefix, low=1)
    if args.speed_lengths:
        overrides["speed_lengths"] = parse_ints("speed-lengths", args.speed_lengths, low=16)
    if args.ppl_text:
        overrides["ppl_text"] = args.ppl_text
    if args.contexts:
        overrides["ruler_contexts"] = parse_ints("contexts", args.contexts, low=64)
    if args.cases is not None:
        overrides["ruler_cases"] = args.cases
    if args.families:
        overrides["ruler_families"] = [f.strip() for f in args.families.split(",") if f.strip()]
    if args.memory_contexts:
        overrides["memory_contexts"] = parse_ints("memory-contexts", args.memory_contexts, low=64)
    if args.batch:
        overrides["memory_batch"] = parse_batch(args.batch)
    if args.repeats is not None:
        overrides["memory_repeats"] = args.repeats
    return BenchConfig.quick_grid(**overrides) if args.quick else BenchConfig(**overrides)


def bench_methods(methods: str | None, suites: list[str]) -> str:
    """`--methods` as given, else the default of the suites named (memory/throughput alone have their own)."""
    from hf_subtok.bench import throughput

    if methods:
        return methods
    if set(suites) <= set(throughput.SUITES):
        return throughput.default_methods()
    return "dense,subtok,kvpress"


def _non_negative(name: str, value: int | None) -> int | None:
    if value is not None and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def cmd_demo(args) -> int:
    from hf_subtok.demo import DEMO_CONTEXT_TOKENS, run_demo

    print(run_demo(args.model, context_tokens=args.context_tokens or DEMO_CONTEXT_TOKENS))
    return 0


def cmd_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"max-new-tokens must be >= 1, got {args.max_new_tokens}")
    config = config_from_args(args)  # validates before the model is loaded
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                prompt = f.read()
        except OSError as e:
            raise CliError(f"file={args.file!r} cannot be read: {e.strerror}") from None
    else:
        prompt = args.prompt
    from hf_subtok import SubTokenCache
    from hf_subtok.demo import run_generate
    from hf_subtok.model_loading import load_model_and_tokenizer
    from hf_subtok.recipes import apply_recipe

    apply_recipe(config, "float32")  # a recipe that conflicts with the options given fails before loading
    model, tokenizer = load_model_and_tokenizer(args.model)
    cache = SubTokenCache(model, config)  # unreachable budgets raise ValueError here
    if tokenizer.chat_template and not args.raw:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
    import torch

    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    logger.info("Prompt: %d tokens", input_ids.shape[1])
    result = run_generate(model, tokenizer, input_ids, cache, "subtok", args.max_new_tokens)
    report = cache.memory_report()
    print(result.answer)
    print()
    print(
        f"memory: stored {report['stored_bytes']:,} B of {report['dense_bytes']:,} dense "
        f"(ratio {report['ratio']:.4f}); {report['tokens_seen']} tokens seen, "
        f"{report['tokens_packed']} packed, keep {describe_keep_groups(report['keep_groups'])} "
        f"of {report['num_groups']} value groups"
        + (f"; recipe {report['recipe']['candidate']} (the {report['recipe']['dtype']} table's row at "
           f"{report['recipe']['budget']:g})" if report["recipe"] else "")
    )
    print(f"speed: prefill {result.prefill_s:.2f} s, decode {result.decode_tok_s:.1f} tokens/s; "
          f"peak RSS {result.peak_rss_mb:.0f} MiB")
    return 0


def describe_keep_groups(keep) -> str:
    """`3` for one K (or every layer alike), `1-4 (mean 2.3)` when layers differ."""
    values = keep if isinstance(keep, (list, tuple)) else [keep]
    values = [v for v in values if v is not None]
    if not values:
        return "?"
    if len(set(values)) == 1:
        return str(values[0])
    return f"{min(values)}-{max(values)} (mean {sum(values) / len(values):.1f})"


def cmd_bench(args, argv: list[str]) -> int:
    from hf_subtok.bench.runner import run_bench

    config = bench_config_from_args(args)
    if any(m.family == "kvpress" for m in config.methods):
        logger.info("kvpress rows: %d", sum(m.family == "kvpress" for m in config.methods))
    elif args.methods is None or "kvpress" in args.methods:
        logger.warning("kvpress is not installed: no kvpress rows (pip install kvpress)")
    result = run_bench(config, command="hf-subtok " + shlex.join(argv))
    print(result["markdown"])
    for kind, path in result["paths"].items():
        logger.info("wrote %s: %s", kind, path)
    return 0


def bench_markdown(argv: list[str]) -> str:
    """Run `hf-subtok <argv>` (a bench) in this process; its Markdown tables."""
    from hf_subtok.bench.runner import run_bench

    args = build_parser().parse_args(argv)
    return run_bench(bench_config_from_args(args), command="hf-subtok " + shlex.join(argv))["markdown"]


def cmd_train_router(args) -> int:
    from hf_subtok.training.command import config_from_args, missing_dependency, run

    problem = missing_dependency(config_from_args(args))  # before any model is loaded
    if problem:
        raise CliError(f"hf-subtok train-router: error: {problem}")
    print(run(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-subtok` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        _setup_logging(args.verbose, args.quiet)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "train-router":
            return cmd_train_router(args)
        if args.command == "calibrate":
            from hf_subtok.rank.command import run_calibrate

            print(run_calibrate(args))
            return 0
        if args.command == "recipes":
            from hf_subtok.bench.recipe_command import run_recipes

            print(run_recipes(args, argv))
            return 0
        if args.command == "scoreboard":
            from hf_subtok.bench.scoreboard import run_scoreboard_command

            print(run_scoreboard_command(args, bench_markdown))
            return 0
        return cmd_bench(args, argv)
    except (CliError, ValueError) as e:
        message = " ".join(str(e).split())
        prefix = "" if message.startswith("hf-subtok") else "hf-subtok: error: "
        print(f"{prefix}{message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("hf-subtok: interrupted (a bench run resumes from its --out folder)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
