"""The `hf-subtok calibrate` subcommand: calibrate a model's key and value bases and save them."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hf_subtok.rank.calibrate import DEFAULT_HELD_OUT, DEFAULT_TOKENS, DEFAULT_WINDOW
from hf_subtok.rank.config import KEY_SPACE, KEY_SPACES

logger = logging.getLogger("hf_subtok.cli")

DEFAULT_TEXT = "haystack"  # the shipped text (the perplexity text "ppl" stays unseen)
_DTYPES = ("float32", "bfloat16", "float16")


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    """Add `calibrate` to the `hf-subtok` subcommands."""
    p = subparsers.add_parser(
        "calibrate", help="calibrate per-layer key/value bases of a model (the rank axis) and save them as an artifact"
    )
    p.add_argument("--out", required=True, help="output folder (config.json, bases.safetensors, README.md)")
    p.add_argument("--model", default=None, help="model id or folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--text", default=DEFAULT_TEXT,
        help=f"a shipped text (haystack, ppl, legal) or a UTF-8 file (default {DEFAULT_TEXT}); its end is held out",
    )
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"calibration tokens (default {DEFAULT_TOKENS})")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"tokens per forward (default {DEFAULT_WINDOW})")
    p.add_argument(
        "--held-out", type=int, default=DEFAULT_HELD_OUT,
        help=f"tokens at the end of the text measured, never fitted (default {DEFAULT_HELD_OUT}; 0: none)",
    )
    p.add_argument("--no-center", action="store_true", help="take coefficients around zero, not the calibration mean")
    p.add_argument(
        "--key-space", default=KEY_SPACE, choices=KEY_SPACES,
        help=f"keys projected after RoPE or before it (default {KEY_SPACE}; pre_rope keeps far more quality at "
        "equal bits: benchmarks/rank_at_equal_bits.py)",
    )
    p.add_argument("--dtype", default="float32", choices=_DTYPES, help="dtype the model runs in (default float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_calibrate(args) -> str:
    """Calibrate, save into `args.out`, and return the summary printed on stdout."""
    import torch

    from hf_subtok.model_loading import load_model_and_tokenizer
    from hf_subtok.rank.calibrate import calibrate_bases

    text, source = read_text(args.text)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype))
    bases = calibrate_bases(
        model, tokenizer, text, tokens=args.tokens, window=args.window, held_out=args.held_out,
        center=not args.no_center, key_space=args.key_space, source=source, progress=not args.no_progress,
    )
    bases.save_pretrained(args.out)
    logger.info("wrote %s", Path(args.out) / "bases.safetensors")
    return summary(bases, args.out)


def read_text(name: str) -> tuple[str, str]:
    """`(text, source)` of a shipped text name or a file path (`ValueError` names it otherwise)."""
    from hf_subtok.tasks import TEXTS, load_text

    if name in TEXTS:
        return load_text(name), f"shipped text {name!r}"
    try:
        return Path(name).read_text(encoding="utf-8"), str(name)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"text={name!r} is neither a shipped text ({', '.join(TEXTS)}) nor a readable UTF-8 file: {e}") from None


def summary(bases, out) -> str:
    """A few lines: where the bases went, their size and the held-out errors."""
    config = bases.config
    lines = [
        f"bases of {config.base_model} ({config.num_layers} layers x {config.num_kv_heads} KV heads x D={config.head_dim}) "
        f"-> {out} ({bases.nbytes() / 2**20:.2f} MiB float32), keys {config.key_space}",
        f"calibration: {config.calibration}",
    ]
    errors = config.metrics.get("relative_error", {})
    if errors:
        ranks = config.metrics["ranks"]
        lines.append("held-out relative error  " + "  ".join(f"r={r:<5}" for r in ranks))
        lines += [f"  {name:<22}" + "  ".join(f"{errors[name][str(r)]:<7.4f}" for r in ranks) for name in errors]
    return "\n".join(lines)
