"""Named configurations: `SubTokenCache(model, "balanced")`."""

from __future__ import annotations

from hf_subtok.config import SubTokenConfig

PRESETS: dict[str, dict] = {
    # 37.5% of the dense bytes, spent jointly on tokens (SnapKV-selected per head) and value groups
    "balanced": {"budget": 0.375, "window": 64},
    # 25% of the dense bytes, same allocator
    "aggressive": {"budget": 0.25, "window": 64},
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
