"""Decode tokens/s of SubTokenCache against DynamicCache on a SmolLM2-135M-shaped model.

The caches are filled with random keys/values of the requested context length (a decode
step's cost does not depend on the values), then one single-token forward is timed on its
own (for SubTokenCache the step that packs the prompt: scoring, planning and quantizing every
token, a one-off cost of compressing the prompt, reported as `first step ms`) and `--steps`
more are timed as the decode speed, alternating the methods over `--rounds` rounds; the
median round is reported.
Methods: groups only (`--keep`, K of 8, every token), named presets (`--presets`: every
axis at the preset's budget, so tokens are evicted, stored in fewer bits and re-selected by
the attention of each step, as in `generate()`) and any other configuration (`--configs`,
`SubTokenConfig` fields as `key=value` joined by `+`).

    python benchmarks/decode_speed.py --contexts 1024 4096 16384 --out bench_out/decode_speed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from hf_subtok import SubTokenCache, SubTokenConfig, cache_kwargs
from hf_subtok.bench.overrides import parse_overrides
from hf_subtok.presets import resolve_config

logger = logging.getLogger("decode_speed")

SMOLLM2_135M_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)


def filled_dense_cache(layers: int, heads: int, tokens: int, dim: int, dtype: torch.dtype) -> DynamicCache:
    cache = DynamicCache()
    generator = torch.Generator().manual_seed(tokens)
    for layer in range(layers):
        keys = torch.randn(1, heads, tokens, dim, generator=generator, dtype=dtype)  # [B, Hkv, T, D]
        values = torch.randn(1, heads, tokens, dim, generator=generator, dtype=dtype)
        cache.update(keys, values, layer)
    return cache


def filled_preset(preset: str) -> SubTokenConfig:
    """The preset, scoring the filled prompt by key norm: `from_dense` has no prompt queries for
    SnapKV (the layout, and so a decode step's cost, is the same whichever tokens are kept)."""
    return dataclasses.replace(resolve_config(preset), token_scorer="key_norm")


def configured(texts: list[str]) -> dict[str, SubTokenConfig]:
    """`{"subtok TEXT": config}` for each `TEXT` of `SubTokenConfig` fields (`key=value` joined
    by `+`); `ValueError` names a bad field or value."""
    return {f"subtok {text}": SubTokenConfig(**dict(parse_overrides(text, SubTokenConfig, what="--configs field"))) for text in texts}


def time_decode(model, cache, start: int, steps: int) -> tuple[float, float]:
    """Seconds of the first step (after `from_dense`, the one that packs the prompt) and of
    the `steps` steps after it."""
    token = torch.tensor([[7]])
    times = []
    with torch.no_grad():
        for step in range(steps + 1):
            begin = time.perf_counter()
            model(input_ids=token, **cache_kwargs(cache), position_ids=torch.tensor([[start + step]]))
            times.append(time.perf_counter() - begin)
    return times[0], sum(times[1:])


def time_prefill(model, tokens: int) -> float:
    """Seconds of one dense forward over `tokens` random tokens filling a DynamicCache, with the
    logits of the last token only (as `generate()` computes them), after a short warm-up call."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        model(input_ids=ids[:, :16], **cache_kwargs(DynamicCache()), logits_to_keep=1)
        begin = time.perf_counter()
        model(input_ids=ids, **cache_kwargs(DynamicCache()), logits_to_keep=1)
        return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=int, nargs="*", default=[3, 4], help="keep_groups of 8 to measure")
    parser.add_argument(
        "--presets", nargs="*", default=[], help="presets to measure too (e.g. balanced compact), at their budgets"
    )
    parser.add_argument(
        "--configs",
        nargs="*",
        default=[],
        help="SubTokenConfig fields as key=value joined by + to measure too, e.g. bits=2+value_codes=16+budget=0.07",
    )
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--prefill", action="store_true", help="also time one dense prefill of each context (what the first step adds to)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out/decode_speed.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logger.info("torch %s, %d threads", torch.__version__, torch.get_num_threads())

    dtype = torch.float32
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M_SHAPE)).eval().to(dtype)
    rows = []
    prefill_ms = {}
    for tokens in args.contexts:
        if args.prefill:
            prefill_ms[tokens] = round(1000 * time_prefill(model, tokens), 1)
            logger.info("T=%d dense prefill: %.0f ms", tokens, prefill_ms[tokens])
        methods = {"dense": None, **{f"subtok k={k}/8": SubTokenConfig(num_groups=8, keep_groups=k, window=args.window) for k in args.keep}}
        methods.update({f"subtok {preset}": filled_preset(preset) for preset in args.presets})
        methods.update(configured(args.configs))
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        first_seconds: dict[str, list[float]] = {name: [] for name in methods}
        ratios: dict[str, float] = {}
        for round_idx in range(args.rounds):
            for name, config in methods.items():
                dense = filled_dense_cache(30, 3, tokens, 64, dtype)
                cache = dense if config is None else SubTokenCache.from_dense(model, config, dense)
                del dense
                first, steady = time_decode(model, cache, tokens, args.steps)
                first_seconds[name].append(first)
                seconds[name].append(steady)
                if config is not None:
                    ratios[name] = cache.memory_report()["ratio"]
                logger.info("T=%d round %d %s: %.2f tok/s", tokens, round_idx, name, args.steps / seconds[name][-1])
                del cache
        dense_tps = args.steps / statistics.median(seconds["dense"])
        for name in methods:
            tps = args.steps / statistics.median(seconds[name])
            rows.append(
                {
                    "context": tokens,
                    "method": name,
                    "decode_tok_s": round(tps, 2),
                    "speed_vs_dense": round(tps / dense_tps, 3),
                    "first_step_ms": round(1000 * statistics.median(first_seconds[name]), 1),
                    "stored_ratio": round(ratios.get(name, 1.0), 4),
                }
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dense_prefill_ms": prefill_ms,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("| context | method | first step ms | decode tok/s | vs dense | stored/dense bytes |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['context']} | {row['method']} | {row['first_step_ms']} | {row['decode_tok_s']} "
            f"| {row['speed_vs_dense']}x | {row['stored_ratio']} |"
        )
    for tokens, ms in prefill_ms.items():
        print(f"dense prefill of {tokens} tokens: {ms} ms")


if __name__ == "__main__":
    main()
