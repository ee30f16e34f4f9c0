"""The `hf-subtok train-router` subcommand: its arguments and what it runs."""

from __future__ import annotations

import argparse
import logging

from hf_subtok.training.evaluate import EvalConfig
from hf_subtok.training.loop import TrainConfig, train_router

logger = logging.getLogger("hf_subtok.cli")


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
    p.add_argument(
        "--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})"
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=d.max_minutes,
        help=f"stop training after this many minutes, then evaluate (default {d.max_minutes:g})",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=d.budget,
        help=f"stored/dense byte ratio the router is trained for; sets K (default {d.budget})",
    )
    p.add_argument(
        "--num-groups",
        type=int,
        default=d.num_groups,
        help=f"value groups per head (default {d.num_groups})",
    )
    p.add_argument(
        "--keep-groups",
        type=int,
        default=None,
        help="groups kept per token (default: from --budget)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=d.seq_len,
        help=f"tokens per training window (default {d.seq_len})",
    )
    p.add_argument(
        "--eval-len",
        type=int,
        default=d.eval_len,
        help=f"scored tail of each window (default {d.eval_len})",
    )
    p.add_argument(
        "--dense-window",
        type=int,
        default=d.dense_window,
        help=f"newest prefix tokens kept whole while training (default {d.dense_window})",
    )
    p.add_argument(
        "--lora-r", type=int, default=d.lora_r, help=f"LoRA rank, 0 for none (default {d.lora_r})"
    )
    p.add_argument("--lr", type=float, default=d.lr, help=f"LoRA learning rate (default {d.lr})")
    p.add_argument(
        "--router-lr",
        type=float,
        default=d.router_lr,
        help=f"router learning rate (default {d.router_lr})",
    )
    p.add_argument(
        "--selector-lr",
        type=float,
        default=d.selector_lr,
        help=f"token selector learning rate (default {d.selector_lr})",
    )
    p.add_argument(
        "--grad-through-prefix",
        action="store_true",
        help="also backpropagate through the prefix's forward (about 1.6x slower per step)",
    )
    p.add_argument(
        "--no-selector", action="store_true", help="do not train the query-aware token selector"
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help=f"steps between checkpoints (default {d.checkpoint_every})",
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


def run(args) -> int:
    """Train, evaluate, save; print the held-out table on stdout."""
    summary = train_router(config_from_args(args), resume=args.resume)
    logger.info("wrote the router to %s", summary["router_dir"])
    metrics = summary.get("metrics")
    if metrics:
        print("| method | stored/dense | held-out ppl | needle |")
        print("|---|---|---|---|")
        for row in metrics["rows"]:
            print(
                f"| {row['method']} | {row['ratio']:.3f} | {row['ppl']:.3f} | "
                f"{row['needle_correct']}/{row['needle_total']} |"
            )
    print(
        f"router: {summary['router_dir']} ({summary['steps']} steps, {summary['train_seconds'] / 60:.1f} min)"
    )
    return 0


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
