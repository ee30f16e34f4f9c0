"""Decode attention over packed storage on a GPU: Triton kernel vs PyTorch reference vs dense SDPA.

For every context length, kept-group count and storage precision, one decode step (Q = 1) of
one layer is timed for each provider; achieved bandwidth is the bytes the provider must read
(keys, kept values, indices, scales and zeros, tail; dense: keys and values) over its time,
and is also given as a fraction of the device's peak. Storage (`--bits`): plain, or packed
keys and value groups in 8/4/2 bits as the cache stores them (`stored.store_keys` /
`store_values` with the default config's layout: keys per token at 8 and 4 bits, per channel
over blocks of `--key-block` tokens at 2; value groups over their least-error range at 2).
`--mass` also asks for the attention each token got, as every evicting layer does while
decoding. Needs a CUDA device: on a machine without one it says so and exits 0.

Rows go to a CSV, written and flushed as each case finishes. A provider or case that raises is
logged and recorded as a row with its `error` (the other rows are still measured); the script
then exits 1. The `triton` provider is dropped, with a warning, when triton is not installed.

Timing (`timing` column): `events` (default) times each call between CUDA events
(`triton.testing.do_bench`, which flushes L2 before every call, when triton is installed), so it
includes the host's launch overhead wherever that exceeds the GPU's work. `--cuda-graph`
captures the calls in a CUDA graph after warm-up and times replays (`do_bench_cudagraph`), which
leaves kernel time only; the calls then run back to back with no L2 flush, so small cases read
partly from L2. The difference of the two is the host overhead.

Dense SDPA (`sdpa_backend`, `sdpa_fused` columns): torch picks the first eligible of its fused
kernels and falls back to the math path, which repeats K/V to every query head and reads far
more than `bytes_read`. fp32 has no flash kernel, and the memory-efficient kernel takes grouped
queries (`enable_gqa`) only in some torch versions, so `--dtype fp32` SDPA usually falls back to
the math path. `sdpa_fused` lists the fused kernels torch reports eligible for each case
("none": the math path); `--sdpa-backend` pins one (a case it cannot run becomes an error row).
The SDPA settings are logged at the start.

    python benchmarks/gpu_decode_kernel.py --tokens 4096 16384 65536 131072 --keep 8 4 2 1 --bits none 4 2 --out bench_out/kernels.csv
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import sys
from pathlib import Path

import torch

from hf_subtok import SubTokenConfig
from hf_subtok.kernels import pack_value_groups, packed_attention
from hf_subtok.kernels._dispatch import triton_available
from hf_subtok.quant import ChannelQuantizedTensor
from hf_subtok.quant.channel import BLOCK_INDEX_DTYPE
from hf_subtok.storage.tensors import Stored, store_keys, store_values, stored_parts
from hf_subtok.views import PackedKV

logger = logging.getLogger("kernels_bench")
PROVIDERS = ("sdpa", "torch", "triton")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FIELDS = [
    "device", "provider", "dtype", "batch", "kv_heads", "q_per_kv", "head_dim", "tokens", "window",
    "groups", "keep", "bits", "mass", "budget", "ms", "bytes_read", "gbps", "peak_fraction", "speedup_vs_sdpa",
    "timing", "sdpa_backend", "sdpa_fused", "error",
]  # fmt: skip
# --sdpa-backend choices: torch.nn.attention.SDPBackend member names ("auto": torch chooses)
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH",
}  # fmt: skip


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
    except ImportError:
        return _events_ms(fn)
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _events_ms(fn, warmup: int = 5, calls: int = 20) -> float:
    """Median milliseconds of `fn()` between CUDA events, one call at a time."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def time_ms_cuda_graph(fn) -> float:
    """Median milliseconds of `fn()` replayed from a CUDA graph captured after warm-up, so no
    host launch overhead (triton.testing.do_bench_cudagraph when available)."""
    try:
        from triton.testing import do_bench_cudagraph
    except ImportError:
        return _graph_ms(fn)
    return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))


def _graph_ms(fn, warmup: int = 5, calls: int = 20, replays: int = 10) -> float:
    """Median milliseconds per call of a CUDA graph holding `calls` calls of `fn()`, captured
    after `warmup` calls on a side stream (allocations and compiles happen there, not in the
    capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


TIMERS = {"events": time_ms, "cuda-graph": time_ms_cuda_graph}


def timing_mode(args, device: torch.device) -> str:
    """The `TIMERS` key `args` asks for; `--cuda-graph` needs a CUDA device."""
    if args.cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got device={str(device)!r}")
    return "cuda-graph" if args.cuda_graph else "events"


def available_providers(providers: list[str]) -> list[str]:
    """`providers` without `triton` (a warning logged) when the triton package is missing."""
    if "triton" not in providers or triton_available():
        return list(providers)
    logger.warning("triton is not installed: the triton provider is skipped (pip install 'hf-subtok[triton]')")
    kept = [p for p in providers if p != "triton"]
    if not kept:
        raise ValueError(f"providers={providers!r} leaves nothing to measure without triton")
    return kept


def sdpa_context(backend: str) -> contextlib.AbstractContextManager:
    """Pin dense SDPA to `backend` (a `SDPA_BACKENDS` key) while timing; "auto": torch's choice."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[backend]))


def sdpa_fused(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> str:
    """The fused SDPA kernels torch reports eligible for these CUDA inputs under the current
    settings, e.g. "flash+efficient" ("none": the math path; "" off CUDA; "unknown" when this
    torch cannot say)."""
    if query.device.type != "cuda":
        return ""
    cuda = torch.backends.cuda
    checks = {
        "flash": getattr(cuda, "can_use_flash_attention", None),
        "efficient": getattr(cuda, "can_use_efficient_attention", None),
        "cudnn": getattr(cuda, "can_use_cudnn_attention", None),
    }
    try:
        params = cuda.SDPAParams(query, keys, values, None, 0.0, False, True)  # no mask, no dropout, GQA
        eligible = [name for name, check in checks.items() if check is not None and check(params, False)]
    except (AttributeError, TypeError, RuntimeError):
        return "unknown"
    return "+".join(eligible) or "none"


def sdpa_settings() -> str:
    """torch's global SDPA switches (and flash availability), for the log."""
    cuda = torch.backends.cuda
    settings = {
        "flash_available": getattr(cuda, "is_flash_attention_available", lambda: "unknown")(),
        "flash": cuda.flash_sdp_enabled(),
        "mem_efficient": cuda.mem_efficient_sdp_enabled(),
        "cudnn": getattr(cuda, "cudnn_sdp_enabled", lambda: "unknown")(),
        "math": cuda.math_sdp_enabled(),
    }
    return ", ".join(f"{name}={value}" for name, value in settings.items())


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


def case_fields(args, device: torch.device, tokens: int, keep: int, bits: int | None) -> dict:
    """The CSV fields every provider's row of one case shares; the others empty."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return {
        **dict.fromkeys(FIELDS, ""),
        **dict(
            device=device_name, dtype=args.dtype, batch=args.batch, kv_heads=args.kv_heads, q_per_kv=args.q_per_kv,
            head_dim=args.head_dim, tokens=tokens, window=args.window, groups=args.groups, keep=keep,
            bits="none" if bits is None else bits, mass=args.mass,
        ),
    }  # fmt: skip


def error_text(error: BaseException) -> str:
    """`error` as one CSV-friendly line."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:500]


def run_case(
    args, tokens: int, keep: int, bits: int | None, peak: float | None, device: torch.device, timer=None
) -> list[dict]:
    """One row per provider; `timer(fn) -> ms` (default: `TIMERS[timing_mode(...)]`, CUDA). A
    provider that raises is logged and gets a row with its `error` (no timing)."""
    timing = timing_mode(args, device)
    timing, timer = (timing, TIMERS[timing]) if timer is None else ("custom", timer)
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
    shared = case_fields(args, device, tokens, keep, bits)
    shared.update(budget=round(packed_bytes / dense_bytes, 4), timing=timing)
    rows, sdpa_ms = [], None
    for provider in args.providers:
        fn, read = calls[provider]
        row = dict(shared, provider=provider, bytes_read=read)
        try:
            with sdpa_context(args.sdpa_backend if provider == "sdpa" else "auto"):
                if provider == "sdpa":
                    row.update(sdpa_backend=args.sdpa_backend, sdpa_fused=sdpa_fused(query, keys, values))
                ms = timer(fn)
        except Exception as error:
            logger.exception("%7d tokens K=%d/%d bits=%s %-6s failed", tokens, keep, args.groups, bits, provider)
            rows.append(dict(row, error=error_text(error)))
            continue
        sdpa_ms = ms if provider == "sdpa" else sdpa_ms
        gbps = read / (ms * 1e-3) / 1e9
        row.update(
            ms=round(ms, 4), gbps=round(gbps, 1), peak_fraction=round(gbps / peak, 3) if peak else "",
            speedup_vs_sdpa=round(sdpa_ms / ms, 3) if sdpa_ms else "",
        )  # fmt: skip
        rows.append(row)
        logger.info(
            "%7d tokens K=%d/%d bits=%s %-6s %8.3f ms %8.1f GB/s", tokens, keep, args.groups, bits, provider, ms, gbps
        )
    return rows


def case_rows(
    args, tokens: int, keep: int, bits: int | None, peak: float | None, device: torch.device, timer=None
) -> list[dict]:
    """`run_case`'s rows; a case that cannot be built is logged and gets an error row per provider."""
    try:
        return run_case(args, tokens, keep, bits, peak, device, timer)
    except Exception as error:
        logger.exception("%7d tokens K=%d/%d bits=%s: case failed", tokens, keep, args.groups, bits)
        shared = case_fields(args, device, tokens, keep, bits)
        return [dict(shared, provider=provider, error=error_text(error)) for provider in args.providers]


def run_all(args, peak: float | None, device: torch.device, timer=None) -> tuple[int, int]:
    """Every case of `args` on `device`, each row written to `args.out` (opened once, header
    first) and flushed as its case finishes. Returns `(rows, rows with an error)`."""
    timing_mode(args, device)  # refuse a bad timing mode before any file is written
    args.out.parent.mkdir(parents=True, exist_ok=True)
    written = failed = 0
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        handle.flush()
        for tokens in args.tokens:
            for keep in args.keep:
                for bits in args.bits:
                    for row in case_rows(args, tokens, keep, None if bits == "none" else int(bits), peak, device, timer):
                        writer.writerow(row)
                        handle.flush()
                        written, failed = written + 1, failed + bool(row["error"])
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return written, failed


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
    parser.add_argument(
        "--cuda-graph", action="store_true", help="time replays of a CUDA graph (kernel time, no launch overhead)"
    )
    parser.add_argument(
        "--sdpa-backend", choices=["auto", *SDPA_BACKENDS], default="auto", help="pin dense SDPA's kernel"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out/kernels.csv"))
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not torch.cuda.is_available():
        logger.info("no CUDA device: the kernel benchmark runs on GPUs only; nothing measured")
        return 0
    args.providers = available_providers(args.providers)
    device = torch.device("cuda")
    peak = args.peak_gbps or peak_bandwidth_gbps(device)
    logger.info("device: %s, peak bandwidth: %s GB/s", torch.cuda.get_device_name(device), peak or "unknown")
    logger.info(
        "dtype %s, timing %s, SDPA backend %s (%s)",
        args.dtype, timing_mode(args, device), args.sdpa_backend, sdpa_settings(),
    )  # fmt: skip
    written, failed = run_all(args, peak, device)
    logger.info("wrote %d rows to %s", written, args.out)
    if failed:
        logger.error("%d of %d rows failed: see their error column", failed, written)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
