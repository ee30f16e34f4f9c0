"""The `hf-subtok train-router` subcommand: its arguments and what it runs."""

from __future__ import annotations

import argparse
import logging

from hf_subtok.training.evaluate import EvalConfig
from hf_subtok.training.loop import TrainConfig, train_router

logger = logging.getLogger("hf_subtok.cli")


# Options read straight from `TrainConfig` fields of the same name: (flag, type, help).
_TRAIN_OPTIONS = (
    ("--steps", int, "optimizer steps"),
    ("--max-minutes", float, "stop training after this many minutes, then evaluate"),
    ("--budget", float, "stored/dense byte ratio the router is trained for; sets K"),
    ("--num-groups", int, "value groups per head"),
    ("--seq-len", int, "tokens per training window"),
    ("--eval-len", int, "scored tail of each window"),
    ("--dense-window", int, "newest prefix tokens kept whole while training"),
    ("--lora-r", int, "LoRA rank, 0 for none"),
    ("--lr", float, "LoRA learning rate"),
    ("--router-lr", float, "router learning rate"),
    ("--selector-lr", float, "token selector learning rate"),
    ("--checkpoint-every", int, "steps between checkpoints"),
)


def add_parser(sub) -> argparse.ArgumentParser:
    """Add `train-router` to the `hf-subtok` subcommands."""
    d = TrainConfig()
    p = sub.add_parser(
        "train-router",
        help="train a learned value-group router (+ LoRA) for a model, then evaluate it on held-out text",
    )
    p.add_argument(
        "--model", default=None, help="model id or folder (default: embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--text", default=None, help="training text file (default: the shipped haystack text)"
    )
    p.add_argument(
        "--out",
        default=d.out,
        help=f"output folder: checkpoint/, router/, eval.json (default {d.out})",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    for flag, kind, help_text in _TRAIN_OPTIONS:
        default = getattr(d, flag.removeprefix("--").replace("-", "_"))
        p.add_argument(flag, type=kind, default=default, help=f"{help_text} (default {default})")
    p.add_argument(
        "--keep-groups",
        type=int,
        default=None,
        help="groups kept per token (default: from --budget)",
    )
    p.add_argument(
        "--grad-through-prefix",
        action="store_true",
        help="also backpropagate through the prefix's forward (about 1.6x slower per step)",
    )
    p.add_argument(
        "--no-selector", action="store_true", help="do not train the query-aware token selector"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument(
        "--eval-prefix",
        type=int,
        default=d.eval.ppl_prefix,
        help=f"held-out ppl: tokens compressed before scoring (default {d.eval.ppl_prefix})",
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=d.eval.ppl_eval,
        help=f"held-out ppl: tokens scored (default {d.eval.ppl_eval})",
    )
    p.add_argument(
        "--needle-lengths",
        default=",".join(map(str, d.eval.needle_lengths)),
        help="needle prompt lengths, comma separated (default %(default)s)",
    )
    p.add_argument(
        "--needle-depths",
        default=",".join(map(str, d.eval.needle_depths)),
        help="needle depths in [0, 1], comma separated (default %(default)s)",
    )
    p.add_argument(
        "--window", type=int, default=d.eval.window, help="dense window of the evaluated caches"
    )
    p.add_argument(
        "--evict-budget",
        type=float,
        default=d.eval.evict_budget,
        help="also compare token eviction at this budget (snapkv vs the learned selector; 0: skip)",
    )
    return p


def config_from_args(args) -> TrainConfig:
    """A validated `TrainConfig` (ValueError names the bad option)."""
    evict = args.evict_budget if args.evict_budget else None
    if evict is not None and not 0 < evict <= 1:
        raise ValueError(f"evict-budget must be in (0, 1], got {evict}")
    eval_config = EvalConfig(
        ppl_prefix=_positive("eval-prefix", args.eval_prefix),
        ppl_eval=_positive("eval-tokens", args.eval_tokens, low=2),
        needle_lengths=tuple(
            _positive("needle-lengths", int(x), low=64) for x in _split(args.needle_lengths, int)
        ),
        needle_depths=tuple(_depth(x) for x in _split(args.needle_depths, float)),
        window=_positive("window", args.window, low=0),
        evict_budget=evict,
    )
    return TrainConfig(
        model=args.model,
        text=args.text,
        out=args.out,
        steps=args.steps,
        max_minutes=args.max_minutes,
        budget=args.budget,
        num_groups=args.num_groups,
        keep_groups=args.keep_groups,
        seq_len=args.seq_len,
        eval_len=args.eval_len,
        dense_window=args.dense_window,
        lora_r=args.lora_r,
        lr=args.lr,
        router_lr=args.router_lr,
        selector_lr=args.selector_lr,
        selector=not args.no_selector,
        grad_through_prefix=args.grad_through_prefix,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        evaluate=not args.no_eval,
        eval=eval_config,
    )


TRAIN_EXTRA = "pip install 'hf-subtok[train]'"


def missing_dependency(config: TrainConfig) -> str | None:
    """Why `config` cannot be trained in this environment (peft missing for a LoRA), or None."""
    if not config.lora_r:
        return None
    try:
        import peft  # noqa: F401
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and e.name == "peft"
        reason = "it is not installed" if missing else f"importing it failed ({e})"
        return (
            f"training a router with a LoRA (--lora-r {config.lora_r}) needs peft, but {reason}: "
            f"{TRAIN_EXTRA} (or pass --lora-r 0 to train the router alone)"
        )
    return None


def run(args) -> str:
    """Train, evaluate, save; return the held-out table and where the router went (for stdout)."""
    summary = train_router(config_from_args(args), resume=args.resume)
    logger.info("wrote the router to %s", summary["router_dir"])
    lines = []
    metrics = summary.get("metrics")
    if metrics:
        lines += ["| method | stored/dense | held-out ppl | needle |", "|---|---|---|---|"]
        lines += [
            f"| {row['method']} | {row['ratio']:.3f} | {row['ppl']:.3f} | "
            f"{row['needle_correct']}/{row['needle_total']} |"
            for row in metrics["rows"]
        ]
    minutes = summary["train_seconds"] / 60
    lines.append(f"router: {summary['router_dir']} ({summary['steps']} steps, {minutes:.1f} min)")
    return "\n".join(lines)


def _split(text: str, kind) -> list:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    try:
        return [kind(x) for x in items]
    except ValueError:
        raise ValueError(f"expected a comma list of {kind.__name__}s, got {text!r}") from None


def _positive(name: str, value: int, low: int = 1) -> int:
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _depth(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"needle-depths must be in [0, 1], got {value}")
    return value
