"""`hf-subtok bench`: quality, memory and speed of KV-cache methods on one model.

Suites: `needle` (pass-key retrieval, two settings), `ppl` (perplexity after a compressed
prefix), `speed` (prefill, decode, peak RSS, stored bytes). Methods: `dense`, `subtok@B` (and
ablations `subtok:KEY=VALUE@B`), kvpress presses at the same stored bytes, and transformers'
`QuantizedCache` (`quantized`). The model runs in `BenchConfig.dtype`; every ratio is against
the dense cache in that dtype. See `hf_subtok.bench.methods` for the grammar, `run_bench` and
`BenchConfig`.
"""

from hf_subtok.bench.methods import MethodSpec, parse_budgets, parse_methods, parse_suites
from hf_subtok.bench.runner import DEFAULT_BUDGETS, SUITES, BenchConfig, run_bench

__all__ = [
    "DEFAULT_BUDGETS",
    "SUITES",
    "BenchConfig",
    "MethodSpec",
    "parse_budgets",
    "parse_methods",
    "parse_suites",
    "run_bench",
]
