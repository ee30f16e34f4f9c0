"""Decode attention over packed storage on a GPU: Triton kernel vs PyTorch reference vs dense SDPA.

For every context length, kept-group count and storage precision, one decode step (Q = 1) of
one layer is timed for each provider; achieved bandwidth is the bytes the provider must read
(keys, kept values, indices, scales and zeros, tail; dense: keys and values) over its time,
and is also given as a fraction of the device's peak. Storage (`--bits`): plain, or packed
keys and value groups in 8/4/2 bits as the cache stores them (`stored.store_keys` /
`store_values` with the default config's layout: keys per token at 8 and 4 bits, per channel
over blocks of `--key-block` tokens at 2; value groups over their least-error range at 2).
`--mass` also asks for the attention each token got, as every evicting layer does while
decoding. Rows go to a CSV; the device name is printed. Needs a CUDA device: on a machine
without one it says so and exits 0.

    python benchmarks/gpu_decode_kernel.py --tokens 4096 16384 65536 131072 --keep 8 4 2 1 --bits none 4 2 --out bench_out/kernels.csv
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import torch

from hf_subtok import SubTokenConfig
from hf_subtok.kernels import pack_value_groups, packed_attention
from hf_subtok.packed import PackedKV
from hf_subtok.quant import ChannelQuantizedTensor
from hf_subtok.quant.channel import BLOCK_INDEX_DTYPE
from hf_subtok.stored import Stored, store_keys, store_values, stored_parts

logger = logging.getLogger("kernels_bench")
PROVIDERS = ("sdpa", "torch", "triton")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FIELDS = [
    "device", "provider", "dtype", "batch", "kv_heads", "q_per_kv", "head_dim", "tokens", "window",
    "groups", "keep", "bits", "mass", "budget", "ms", "bytes_read", "gbps", "peak_fraction", "speedup_vs_sdpa",
]  # fmt: skip


def peak_bandwidth_gbps(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth from the device properties (double data rate), if reported."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def time_ms(fn) -> float:
    """Median milliseconds of `fn()` (triton.testing.do_bench when available)."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except ImportError:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(5):
            fn()
        times = []
        for _ in range(20):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def nbytes(*tensors: Stored) -> int:
    """Bytes of plain or quantized tensors (payload, scales, zeros and block runs)."""
    return sum(t.numel() * t.element_size() for x in tensors for t in stored_parts("x", x).values())


def expanded_block_bytes(keys: Stored) -> int:
    """Bytes of the per-token block index attention expands from per-channel keys' runs (0 for
    other keys)."""
    if not isinstance(keys, ChannelQuantizedTensor):
        return 0
    return keys.payload.shape[:-1].numel() * BLOCK_INDEX_DTYPE.itemsize


def stored_case(args, tokens: int, keep: int, bits: int | None, device: torch.device):
    """(query, dense keys, dense values, `PackedKV` per backend) of one layer: every token but the
    window packed with K = `keep` of the groups, plain (`bits=None`) or quantized as the cache
    stores it."""
    dtype = DTYPES[args.dtype]
    b, h, r, d, g, w = args.batch, args.kv_heads, args.q_per_kv, args.head_dim, args.groups, args.window
    stored = tokens - w
    keys = torch.randn(b, h, tokens, d, dtype=dtype, device=device)  # [B, Hkv, T, D]
    values = torch.randn(b, h, tokens, d, dtype=dtype, device=device)
    query = torch.randn(b, h * r, 1, d, dtype=dtype, device=device)  # [B, Hq, 1, D]
    scores = torch.rand(b, h, stored, g, device=device)  # [B, Hkv, Ts, G]
    packed, idx = pack_value_groups(values[:, :, :stored], scores, keep)  # [B, Hkv, K, Ts, C]
    storage = SubTokenConfig(num_groups=g, bits=bits, key_block=args.key_block).storage_format(d, dtype.itemsize)
    packed_keys = store_keys(keys[:, :, :stored].contiguous(), storage)  # as the cache stores them
    packed = store_values(packed, storage)
    tail_keys, tail_values = keys[:, :, stored:].contiguous(), values[:, :, stored:].contiguous()
    kv = {backend: PackedKV(packed_keys, packed, idx, g, tail_keys, tail_values, backend) for backend in ("torch", "triton")}
    return query, keys, values, kv


def run_case(
    args, tokens: int, keep: int, bits: int | None, peak: float | None, device: torch.device, timer=None
) -> list[dict]:
    """One row per provider; `timer(fn) -> ms` (default `time_ms`, CUDA)."""
    timer = timer or time_ms
    query, keys, values, kv = stored_case(args, tokens, keep, bits, device)
    held = kv["torch"]
    packed_bytes = nbytes(held.keys, held.values, held.group_idx, held.tail_keys, held.tail_values)
    dense_bytes = nbytes(keys, values)
    # per-channel keys' runs are expanded to a per-token block index each call, which is read too
    read_bytes = packed_bytes + expanded_block_bytes(held.keys)
    calls = {
        "sdpa": (
            lambda: torch.nn.functional.scaled_dot_product_attention(query, keys, values, enable_gqa=True),
            dense_bytes,
        ),
        "torch": (lambda: packed_attention(query, kv["torch"], return_mass=args.mass), read_bytes),
        "triton": (lambda: packed_attention(query, kv["triton"], return_mass=args.mass), read_bytes),
    }
    b, h, r, d, g, w = args.batch, args.kv_heads, args.q_per_kv, args.head_dim, args.groups, args.window
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    rows, sdpa_ms = [], None
    for provider in args.providers:
        fn, read = calls[provider]
        ms = timer(fn)
        sdpa_ms = ms if provider == "sdpa" else sdpa_ms
        gbps = read / (ms * 1e-3) / 1e9
        rows.append(
            dict(
                device=device_name, provider=provider, dtype=args.dtype, batch=b,
                kv_heads=h, q_per_kv=r, head_dim=d, tokens=tokens, window=w, groups=g, keep=keep,
                bits="none" if bits is None else bits, mass=args.mass, budget=round(packed_bytes / dense_bytes, 4), ms=round(ms, 4), bytes_read=read,
                gbps=round(gbps, 1), peak_fraction=round(gbps / peak, 3) if peak else "",
                speedup_vs_sdpa=round(sdpa_ms / ms, 3) if sdpa_ms else "",
            )  # fmt: skip
        )
        logger.info(
            "%7d tokens K=%d/%d bits=%s %-6s %8.3f ms %8.1f GB/s", tokens, keep, g, bits, provider, ms, gbps
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    parser.add_argument("--keep", type=int, nargs="+", default=[8, 4, 2, 1], help="groups kept of --groups")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--q-per-kv", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--peak-gbps", type=float, default=None, help="override the device's peak bandwidth")
    parser.add_argument(
        "--bits", nargs="+", default=["none"], choices=["none", "8", "4", "2"], help="storage precisions"
    )
    parser.add_argument("--key-block", type=int, default=32, help="tokens per key scale at 2 bits (per channel)")
    parser.add_argument("--mass", action="store_true", help="also return each token's attention (evicting layers)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/kernels.csv"))
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not torch.cuda.is_available():
        logger.info("no CUDA device: the kernel benchmark runs on GPUs only; nothing measured")
        return 0
    device = torch.device("cuda")
    peak = args.peak_gbps or peak_bandwidth_gbps(device)
    logger.info("device: %s, peak bandwidth: %s GB/s", torch.cuda.get_device_name(device), peak or "unknown")
    rows = []
    for tokens in args.tokens:
        for keep in args.keep:
            for bits in args.bits:
                rows.extend(run_case(args, tokens, keep, None if bits == "none" else int(bits), peak, device))
                torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    logger.info("wrote %d rows to %s", len(rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
