"""CPU: one decode step of attention over packed storage (PyTorch reference) vs dense SDPA.

At budget b the packed layer keeps `kept` whole keys and K of G value groups per token, sized
so the bytes held are b of the dense bytes (K = G: tokens only; K = G/2: fewer groups, more
tokens; `--groups`: G = 2 is the presets' layout, G = 8 spreads each slot over G-K+1 = 5 groups), stored plain or quantized to 8/4/2 bits (`--bits`; keys in groups of 32 channels,
values per kept group, float16 scales and zeros: the cache's defaults). Each quantized row is
paired with plain storage holding the same number of tokens ("plain, same tokens"), so the
cost of reading quantized storage shows apart from the budget. One layer of SmolLM2-135M's
shape (3 KV heads, 9 query heads, head_dim 64), a 64-token dense window.

Timing: all rows of one (tokens, budget) are timed round-robin for `--rounds` rounds of
`--repeats` calls each (so a busy neighbour slows every row alike); a row's figure is the
median of all its calls. Dense SDPA is timed in every round-robin and its median taken over all.

    python benchmarks/cpu_decode_attention.py --threads 1 --rounds 5 --repeats 10 \\
        --tokens 4096 16384 65536 --budgets 0.5 0.25 0.125 --bits 8 4 2

`--compare-blocks` instead times the reference's blocks of tokens: fixed 1024-token blocks
(before) against byte-sized ones (`block_tokens`, now), interleaved call by call, with the
torch ops of one call, over quantized rows in the presets' layout (G = 2, K = 2 and 1).
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hf_subtok.formats import StorageFormat
from hf_subtok.kernels import pack_value_groups, packed_attention, packed_attention_reference
from hf_subtok.quant import quantize
from hf_subtok.views import PackedKV

KV_HEADS, Q_HEADS, HEAD_DIM, WINDOW, QUANT_GROUP = 3, 9, 64, 64, 32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def time_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    """`repeats` timed calls of `fn` (after one untimed call), in milliseconds."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def stored_tokens(tokens: int, budget: float, keep_groups: int, fmt: StorageFormat) -> int:
    """Packed tokens a layer holding `budget` of the dense bytes of `tokens` tokens can keep."""
    dense_bytes = fmt.dense_token_bytes * tokens
    window_bytes = WINDOW * fmt.dense_token_bytes
    cost = fmt.token_bytes(keep_groups, scored=True)
    return max(1, min(tokens - WINDOW, int((budget * dense_bytes - window_bytes) // cost)))


def packed_layer(
    kept: int, groups: int, keep_groups: int, bits: int | None, dtype: torch.dtype, generator
) -> PackedKV:
    """A layer of `kept` packed tokens with K = `keep_groups` of G = `groups`, plain (`bits=None`)
    or quantized."""
    keys = torch.randn(1, KV_HEADS, kept, HEAD_DIM, generator=generator).to(dtype)  # [B, Hkv, Ts, D]
    values = torch.randn(1, KV_HEADS, kept, HEAD_DIM, generator=generator).to(dtype)
    scores = torch.rand(1, KV_HEADS, kept, groups, generator=generator)
    packed, idx = pack_value_groups(values, scores, keep_groups)  # [B, Hkv, K, Ts, C]
    if bits is not None:
        fmt = StorageFormat(HEAD_DIM, groups, dtype.itemsize, bits, QUANT_GROUP)
        keys = quantize(keys, bits, fmt.key_group_size)
        packed = quantize(packed, bits, fmt.value_group_size)
    tail = torch.randn(2, 1, KV_HEADS, WINDOW, HEAD_DIM, generator=generator).to(dtype)
    valid = torch.ones(1, KV_HEADS, kept, dtype=torch.bool)  # what the cache passes while decoding
    return PackedKV(keys, packed, idx, groups, tail[0], tail[1], "torch", stored_valid=valid)


def run_budget(tokens, budget, args, dense_fn, generator) -> tuple[list[dict], list[float]]:
    """Rows of one (tokens, budget), timed round-robin with dense SDPA; returns them and the
    dense samples."""
    dtype = DTYPES[args.dtype]
    query = torch.randn(1, Q_HEADS, 1, HEAD_DIM, generator=generator).to(dtype)  # [B, Hq, 1, D]
    cases, plain_layers = [], {}
    layouts = [(args.groups[0], args.groups[0])] + [(groups, groups // 2) for groups in args.groups]  # (G, K)
    for groups, keep in layouts:
        for bits in [None, *args.bits]:
            fmt = StorageFormat(HEAD_DIM, groups, dtype.itemsize, bits, QUANT_GROUP)
            kept = stored_tokens(tokens, budget, keep, fmt)
            storage = "plain" if bits is None else f"int{bits}"
            cases.append((storage, groups, keep, kept, packed_layer(kept, groups, keep, bits, dtype, generator)))
            if bits is not None and (kept, groups, keep) not in plain_layers:
                plain_layers[kept, groups, keep] = packed_layer(kept, groups, keep, None, dtype, generator)
    cases += [("plain, same tokens", g, k, kept, kv) for (kept, g, k), kv in plain_layers.items()]
    samples = {i: [] for i in range(len(cases))}
    dense = []
    for _ in range(args.rounds):
        dense += time_ms(dense_fn, args.repeats)
        for i, (*_, kv) in enumerate(cases):
            samples[i] += time_ms(lambda kv=kv: packed_attention(query, kv), args.repeats)
    rows = [
        {"tokens": tokens, "storage": storage, "budget": budget, "groups": groups, "keep_groups": keep,
         "stored_tokens": kept, "ms": statistics.median(samples[i])}
        for i, (storage, groups, keep, kept, _) in enumerate(cases)
    ]  # fmt: skip
    return rows, dense


class CountOps(TorchDispatchMode):
    """Counts the torch ops (aten calls) run while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def compare_blocks(args) -> None:
    """Print, per (tokens, bits, K), ms and ops of the reference with 1024-token blocks and
    with byte-sized blocks, timed alternately (`time.thread_time` at 1 thread)."""
    dtype, generator = DTYPES[args.dtype], torch.Generator().manual_seed(0)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    ref = packed_attention_reference
    sizes = {"1024-token blocks": (1024, 1024), "byte-sized blocks": (ref.BLOCK_TOKENS, ref.MIN_BLOCK_TOKENS)}
    print(f"{args.dtype}, {args.threads} thread(s), median of {args.rounds * args.repeats} alternated calls")
    print("| tokens | bits | K of 2 | blocks | ms | ops |")
    print("|---:|---:|---:|---|---:|---:|")
    for tokens, bits, keep in ((t, b, k) for t in args.tokens for b in args.bits for k in (2, 1)):
        kv = packed_layer(tokens, 2, keep, bits, dtype, generator)
        query = torch.randn(1, Q_HEADS, 1, HEAD_DIM, generator=generator).to(dtype)
        samples, ops = {name: [] for name in sizes}, {}
        for name, (most, least) in sizes.items():
            ref.BLOCK_TOKENS, ref.MIN_BLOCK_TOKENS = most, least
            with torch.no_grad(), CountOps() as counter:
                packed_attention(query, kv, return_mass=True)
            ops[name] = counter.count
        with torch.no_grad():
            for _ in range(args.rounds * args.repeats):
                for name, (most, least) in sizes.items():
                    ref.BLOCK_TOKENS, ref.MIN_BLOCK_TOKENS = most, least
                    start = clock()
                    packed_attention(query, kv, return_mass=True)
                    samples[name].append((clock() - start) * 1e3)
        for name in sizes:
            print(f"| {tokens} | {bits} | {keep} | {name} | {statistics.median(samples[name]):.2f} | {ops[name]} |")
    ref.BLOCK_TOKENS, ref.MIN_BLOCK_TOKENS = sizes["byte-sized blocks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--bits", type=int, nargs="*", default=[8, 4, 2], help="quantized rows (none: plain only)")
    parser.add_argument(
        "--groups", type=int, nargs="+", default=[8, 2],
        help="value groups G per token: rows keep K = G (tokens only, once) and K = G/2 of each",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per row and round")
    parser.add_argument("--out", type=Path, default=Path("bench_out/cpu_decode_attention.csv"))
    parser.add_argument("--compare-blocks", action="store_true", help="time 1024-token against byte-sized blocks")
    args = parser.parse_args()
    bad = [g for g in args.groups if g < 2 or HEAD_DIM % g]
    if bad:
        parser.error(f"--groups must be at least 2 and divide head_dim {HEAD_DIM}, got {bad}")
    torch.set_num_threads(args.threads)
    if args.compare_blocks:
        return compare_blocks(args)
    dtype = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for tokens in args.tokens:
        q, k, v = (torch.randn(1, h, t, HEAD_DIM, generator=generator).to(dtype)
                   for h, t in ((Q_HEADS, 1), (KV_HEADS, tokens), (KV_HEADS, tokens)))  # fmt: skip

        def dense_fn(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        dense, budget_rows = [], []
        for budget in args.budgets:
            part, dense_samples = run_budget(tokens, budget, args, dense_fn, generator)
            budget_rows += part
            dense += dense_samples
        dense_ms = statistics.median(dense)
        rows.append({"tokens": tokens, "storage": "dense sdpa", "budget": 1.0, "groups": 1, "keep_groups": 1,
                     "stored_tokens": tokens, "ms": dense_ms})  # fmt: skip
        rows += budget_rows
    for row in rows:
        dense = next(r["ms"] for r in rows if r["tokens"] == row["tokens"] and r["storage"] == "dense sdpa")
        row["vs_dense"] = row["ms"] / dense
        row["target_2b"] = 2 * row["budget"]
        same = [
            r["ms"] for r in rows
            if r["storage"] == "plain, same tokens" and row["storage"].startswith("int")
            and (r["tokens"], r["budget"], r["groups"], r["keep_groups"], r["stored_tokens"])
            == (row["tokens"], row["budget"], row["groups"], row["keep_groups"], row["stored_tokens"])
        ]  # fmt: skip
        row["vs_plain_same_tokens"] = row["ms"] / same[0] if same else ""
    for row in rows:
        row.update(dtype=args.dtype, threads=args.threads, machine=platform.processor() or platform.machine())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{args.dtype}, {args.threads} thread(s), median of {args.rounds} x {args.repeats} calls per row")
    print("| tokens | storage | budget | K of G | stored tokens | ms | vs dense | target (2b) | vs plain, same tokens |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        same = f"{r['vs_plain_same_tokens']:.2f}x" if r["vs_plain_same_tokens"] != "" else ""
        dense = r["storage"] == "dense sdpa"
        target = "" if dense else f"{r['target_2b']:.2f}x"
        layout = "all" if dense else f"{r['keep_groups']} of {r['groups']}"
        print(
            f"| {r['tokens']} | {r['storage']} | {r['budget']} | {layout} | {r['stored_tokens']} "
            f"| {r['ms']:.3f} | {r['vs_dense']:.2f}x | {target} | {same} |"
        )


if __name__ == "__main__":
    main()
