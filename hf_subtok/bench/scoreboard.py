"""`hf-subtok scoreboard`: the tables BENCHMARKS.md opens with, measured again by one command.

The scoreboard is a fixed list of `hf-subtok bench` runs (`STEPS`), each into a folder of its
own under `--out`, so a scoreboard that stops goes on where it stopped (the bench resumes every
finished case). When the steps asked for have run, their tables replace what stands between the
markers `SCOREBOARD_START` and `SCOREBOARD_END` in the target file, each table under its title
with its command, commit and date; the rest of the file is left as it is.

Quality is one model in both dtypes against dense, `QuantizedCache` (quanto 4- and 2-bit) and
kvpress's TOVA (its best press on our needle) at the bytes the package stored; kvpress rows need
kvpress installed (transformers 5.2), and are left out, with a warning, where it is not.
"""

from __future__ import annotations

import datetime
import logging
import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SCOREBOARD_START = "<!-- scoreboard:start (written by `hf-subtok scoreboard`; edits here are overwritten) -->"
SCOREBOARD_END = "<!-- scoreboard:end -->"
SCOREBOARD_HEADING = (
    "## Scoreboard\n\nThe tables `hf-subtok scoreboard` measures and writes (`--list` prints each step's command; "
    "a step's tables change only when it runs again)."
)
BUDGETS = "0.25,0.125,0.1"
QUALITY_METHODS = "dense,subtok,kvpress:tova,quantized:quanto@4,quantized:quanto@2"
MEMORY_METHODS = "dense,subtok:balanced,subtok:compact,kvpress:tova@0.25,quantized:quanto@4,quantized:quanto@2"
SEEDS = "0,1,2,3,4,5,6,7"  # with three depths: 24 needle cases per setting, 48 per row


@dataclass(frozen=True)
class Step:
    """One `hf-subtok bench` run of the scoreboard: `name` is its folder under `--out`."""

    name: str
    title: str
    argv: tuple[str, ...]  # bench arguments, without --out


def _quality(dtype: str) -> Step:
    return Step(
        f"quality-{dtype}",
        f"Needle (question in the prompt and withheld) and perplexity on the book, {dtype}",
        ("--suite", "needle,ppl", "--lengths", "2k", "--depths", "0.1,0.5,0.9", "--seeds", SEEDS, "--ppl-prefix",
         "2k", "--budgets", BUDGETS, "--methods", QUALITY_METHODS, "--dtype", dtype),
    )


def _legal(dtype: str) -> Step:
    return Step(
        f"ppl-legal-{dtype}",
        f"Perplexity on the legal text (prose of another kind than the book), {dtype}",
        ("--suite", "ppl", "--ppl-prefix", "2k", "--ppl-text", "legal", "--budgets", BUDGETS,
         "--methods", QUALITY_METHODS, "--dtype", dtype),
    )


STEPS: tuple[Step, ...] = (
    _quality("float32"),
    _legal("float32"),
    _quality("bfloat16"),
    _legal("bfloat16"),
    Step(
        "ruler-4k-float32",
        "RULER-style families at 4k, both settings, float32",
        ("--suite", "ruler", "--contexts", "4k", "--cases", "3", "--budgets", BUDGETS, "--methods",
         "dense,subtok,kvpress:tova,quantized:quanto@4"),
    ),
    Step(
        "memory-float32",
        "Peak memory above the weights, each method in its own process, float32",
        ("--suite", "memory", "--memory-contexts", "2k,4k,8k", "--batch", "8x2k", "--repeats", "3",
         "--methods", MEMORY_METHODS),
    ),
    Step(
        "memory-bfloat16",
        "Peak memory above the weights, each method in its own process, bfloat16",
        ("--suite", "memory", "--memory-contexts", "2k,4k,8k", "--batch", "8x2k", "--repeats", "3",
         "--methods", MEMORY_METHODS, "--dtype", "bfloat16"),
    ),
    Step(
        "throughput-float32",
        "Prefill and decode time against dense, each method in its own process, float32",
        ("--suite", "throughput", "--memory-contexts", "2k,4k,8k", "--batch", "8x2k", "--repeats", "3",
         "--methods", "dense,subtok:balanced,subtok:compact,quantized:quanto@4"),
    ),
)


def select_steps(only: str | None) -> list[Step]:
    """The steps named in `only` (comma-separated), in scoreboard order; all when None."""
    if not only:
        return list(STEPS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {s.name for s in STEPS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"only: unknown step(s) {', '.join(unknown)}; steps: {', '.join(s.name for s in STEPS)}")
    return [s for s in STEPS if s.name in names]


def without_kvpress(argv: Sequence[str]) -> tuple[str, ...]:
    """`argv` with the `kvpress:*` entries of `--methods` dropped."""
    out = list(argv)
    if "--methods" in out:
        at = out.index("--methods") + 1
        out[at] = ",".join(m for m in out[at].split(",") if not m.strip().startswith("kvpress"))
    return tuple(out)


def step_argv(step: Step, out_dir: Path, *, have_kvpress: bool, extra: Sequence[str] = ()) -> list[str]:
    """The `bench` arguments of `step`, writing into `out_dir / step.name`."""
    argv = step.argv if have_kvpress else without_kvpress(step.argv)
    return ["bench", *argv, *extra, "--out", str(out_dir / step.name)]


def run_scoreboard(
    steps: Sequence[Step],
    out_dir: Path,
    target: Path,
    run_bench_argv: Callable[[list[str]], str],
    *,
    have_kvpress: bool,
    extra: Sequence[str] = (),
) -> str:
    """Run each step (`run_bench_argv(argv)` returns the bench's Markdown), then write the tables
    between the markers of `target`; returns the section written."""
    if not have_kvpress:
        logger.warning("kvpress is not installed: the scoreboard has no kvpress rows (pip install kvpress)")
    commit, date = _commit(), datetime.datetime.now(datetime.UTC).date().isoformat()
    blocks = []
    for step in steps:
        argv = step_argv(step, out_dir, have_kvpress=have_kvpress, extra=extra)
        logger.info("scoreboard step %s: hf-subtok %s", step.name, shlex.join(argv))
        markdown = run_bench_argv(argv)
        blocks.append((
            step.name,
            f"### {step.title}\n\n```bash\nhf-subtok {shlex.join(argv)}\n```\n\n"
            f"Commit {commit}, {date}.\n\n{markdown.strip()}\n",
        ))
    return write_blocks(target, blocks)


def write_blocks(target: Path, blocks: Sequence[tuple[str, str]]) -> str:
    """Put the `(step name, Markdown)` blocks between the scoreboard markers of `target` (added,
    under a `## Scoreboard` heading, before its first `## ` heading when missing), keeping the other steps' blocks that stand
    there, in scoreboard order; returns what now stands between the markers."""
    text = target.read_text(encoding="utf-8") if target.exists() else "# Benchmarks\n"
    if SCOREBOARD_START not in text:
        marks = f"{SCOREBOARD_HEADING}\n\n{SCOREBOARD_START}\n{SCOREBOARD_END}\n\n"
        at = text.find("\n## ")
        text = text + "\n" + marks if at < 0 else text[: at + 1] + marks + text[at + 1 :]
    head, rest = text.split(SCOREBOARD_START, 1)
    old, tail = rest.split(SCOREBOARD_END, 1)
    written = {name for name, _ in blocks}
    merged = [(name, block) for name, block in _step_blocks(old) if name not in written] + list(blocks)
    merged.sort(key=lambda item: _order(item[0]))
    body = "".join(f"<!-- step:{name} -->\n{block.strip()}\n\n" for name, block in merged)
    target.write_text(f"{head}{SCOREBOARD_START}\n\n{body}{SCOREBOARD_END}{tail}", encoding="utf-8")
    return body


def _step_blocks(text: str) -> list[tuple[str, str]]:
    """`(step name, block)` of each `<!-- step:NAME -->` marker's block in `text`."""
    blocks = []
    for chunk in text.split("<!-- step:")[1:]:
        name, _, block = chunk.partition(" -->")
        blocks.append((name.strip(), block))
    return blocks


def _order(name: str) -> int:
    names = [s.name for s in STEPS]
    return names.index(name) if name in names else len(names)


def _commit() -> str:
    """The checkout's short commit (`+changes` when the tree differs from it), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def add_scoreboard_parser(subparsers) -> None:
    """Add `scoreboard` to the `hf-subtok` subcommands."""
    p = subparsers.add_parser(
        "scoreboard",
        help="run every benchmark BENCHMARKS.md opens with and write their tables there (resumable)",
    )
    p.add_argument("--only", default=None, help="comma-separated steps to run (default all; --list names them)")
    p.add_argument("--list", action="store_true", help="print each step's bench command and stop")
    p.add_argument("--out", default="bench_out/scoreboard", help="folder of the steps' bench folders (resumable)")
    p.add_argument("--target", default="BENCHMARKS.md", help="file whose scoreboard section is rewritten")
    p.add_argument("--model", default=None, help="model id or folder (default: embedded SmolLM2-135M-Instruct)")


def run_scoreboard_command(args, run_bench_argv: Callable[[list[str]], str]) -> str:
    """`hf-subtok scoreboard`: the steps' commands (`--list`), or the section written (each step
    run by `run_bench_argv`, the command line's bench)."""
    from hf_subtok.bench.kvpress_methods import kvpress_version

    steps = select_steps(args.only)
    have_kvpress = kvpress_version() is not None
    extra = ("--model", args.model) if args.model else ()
    if args.list:
        return "\n".join(
            f"{s.name}: hf-subtok {shlex.join(step_argv(s, Path(args.out), have_kvpress=have_kvpress, extra=extra))}"
            for s in steps
        )
    return run_scoreboard(steps, Path(args.out), Path(args.target), run_bench_argv, have_kvpress=have_kvpress,
                          extra=extra)
