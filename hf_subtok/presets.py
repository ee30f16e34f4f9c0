"""Named configurations: `SubTokenCache(model, "balanced")`."""

from __future__ import annotations

from hf_subtok.config import SubTokenConfig

PRESETS: dict[str, dict] = {
    # keys whole, 4 of 8 value groups: about 0.75 of the dense bytes
    "balanced": {"num_groups": 8, "keep_groups": 4, "window": 64},
    # keys whole, 2 of 8 value groups: about 0.63 of the dense bytes
    "aggressive": {"num_groups": 8, "keep_groups": 2, "window": 64},
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
