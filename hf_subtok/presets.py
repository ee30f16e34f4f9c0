"""Named configurations: `SubTokenCache(model, "balanced")`."""

from __future__ import annotations

from hf_subtok.config import SubTokenConfig

# Every axis under one budget: tokens (SnapKV per head), value groups (G=2) and precision
# (each layer's plan picks full, 8, 4 or 2 bits), with a 16-token dense window. Chosen on
# SmolLM2-135M-Instruct (BENCHMARKS.md, "Presets").
_ALL_AXES = {"bits": "auto", "num_groups": 2, "window": 16, "pack_chunk": 8}

PRESETS: dict[str, dict] = {
    # 25% of the dense bytes (float32 SmolLM2, 1k/2k needle): 12/12 with the question in the
    # prompt, 11/12 withheld, ppl +0.4%
    "balanced": {**_ALL_AXES, "budget": 0.25},
    # 12.5% of the dense bytes: needle in the prompt as dense (12/12), ppl +0.2%; a question
    # asked after compression is answered less often (9/12)
    "aggressive": {**_ALL_AXES, "budget": 0.125},
    # 10% of the dense bytes (about 2-bit QuantizedCache's, which collapses there): every
    # survivor in 2 bits, Hadamard-rotated, keys per channel, value groups over their
    # least-error range (value_clip="auto" at 2 bits); 12/12 in the prompt, 11/12 withheld, ppl
    # +1.9% over four continuations, +4.1% at worst (BENCHMARKS.md, "At 2-bit QuantizedCache's bytes")
    "compact": {**_ALL_AXES, "bits": 2, "rotate": True, "budget": 0.1},
    # every token, 4 of 8 value groups (about 0.76 of the dense bytes): no token is ever dropped
    "groups-only": {"num_groups": 8, "keep_groups": 4, "window": 64},
    # every group kept: same tokens as DynamicCache, for checks
    "lossless": {"num_groups": 8, "keep_groups": 8, "window": 64},
}


def resolve_config(config: SubTokenConfig | str | None) -> SubTokenConfig:
    """A `SubTokenConfig` from a config, a preset name, or None (the defaults)."""
    if config is None:
        return SubTokenConfig()
    if isinstance(config, SubTokenConfig):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"config preset must be one of {sorted(PRESETS)}, got {config!r}")
        return SubTokenConfig(**PRESETS[config])
    raise TypeError(f"config must be a SubTokenConfig, a preset name or None, got {type(config).__name__}")
