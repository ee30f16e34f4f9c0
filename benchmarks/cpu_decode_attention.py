"""CPU: one decode step of attention over packed storage (PyTorch reference) vs dense SDPA.

At budget b the packed layer keeps `keep_tokens` whole keys and K of G value groups per
token, sized so the bytes held are b of the dense bytes (`axes=tokens`: K = G; `axes=both`:
K = G/2 and more tokens). One layer of SmolLM2-135M's shape (3 KV heads, 9 query heads,
head_dim 64), fp32, a 64-token dense window; the median of `--repeats` timed calls.

    python benchmarks/cpu_decode_attention.py --tokens 4096 16384 65536 --budgets 0.5 0.25 0.125
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_subtok.accounting import StorageFormat
from hf_subtok.kernels import pack_value_groups, packed_attention
from hf_subtok.packed import PackedKV

KV_HEADS, Q_HEADS, HEAD_DIM, GROUPS, WINDOW = 3, 9, 64, 8, 64


def median_ms(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def packed_layer(tokens: int, budget: float, keep_groups: int, generator) -> PackedKV:
    """A layer holding `budget` of the dense bytes of `tokens` tokens."""
    dense_row = 2 * HEAD_DIM * 4 * tokens
    window_row = WINDOW * 2 * HEAD_DIM * 4
    cost = StorageFormat(HEAD_DIM, GROUPS, 4).token_bytes(keep_groups, scored=True)
    kept = max(1, min(tokens - WINDOW, int((budget * dense_row - window_row) // cost)))
    keys = torch.randn(1, KV_HEADS, kept, HEAD_DIM, generator=generator)  # [B, Hkv, Ts, D]
    values = torch.randn(1, KV_HEADS, kept, HEAD_DIM, generator=generator)
    scores = torch.rand(1, KV_HEADS, kept, GROUPS, generator=generator)
    packed, idx = pack_value_groups(values, scores, keep_groups)
    tail = torch.randn(2, 1, KV_HEADS, WINDOW, HEAD_DIM, generator=generator)
    valid = torch.ones(1, KV_HEADS, kept, dtype=torch.bool)
    return PackedKV(keys, packed, idx, GROUPS, tail[0], tail[1], "torch", stored_valid=valid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench_out/cpu_decode_attention.csv"))
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for tokens in args.tokens:
        query = torch.randn(1, Q_HEADS, 1, HEAD_DIM, generator=generator)  # [B, Hq, 1, D]
        keys = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=generator)
        values = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=generator)
        dense_ms = median_ms(
            lambda q=query, k=keys, v=values: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), args.repeats
        )
        rows.append({"tokens": tokens, "method": "dense sdpa", "budget": 1.0, "keep_groups": GROUPS, "ms": dense_ms})
        for budget in args.budgets:
            for keep in (GROUPS, GROUPS // 2):
                kv = packed_layer(tokens, budget, keep, generator)
                ms = median_ms(lambda q=query, kv=kv: packed_attention(q, kv), args.repeats)
                rows.append({"tokens": tokens, "method": "packed (reference)", "budget": budget, "keep_groups": keep, "ms": ms})
    for row in rows:
        dense = next(r["ms"] for r in rows if r["tokens"] == row["tokens"] and r["method"] == "dense sdpa")
        row["vs_dense"] = row["ms"] / dense
        row["target_2b"] = 2 * row["budget"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("| tokens | method | budget | K of 8 | ms | time vs dense | target (2b) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['method']} | {r['budget']} | {r['keep_groups']} | {r['ms']:.3f} | {r['vs_dense']:.2f}x | {r['target_2b']:.2f}x |")


if __name__ == "__main__":
    main()
