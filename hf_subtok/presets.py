"""Named configurations: `SubTokenCache(model, "balanced")`."""

from __future__ import annotations

from hf_subtok.config import SubTokenConfig

# Named points of the budget -> recipe table (`hf_subtok.recipes`): each sets a budget, and the
# table gives the recipe measured best there for the model's dtype (BENCHMARKS.md, first section).
PRESET_BUDGETS: dict[str, float] = {
    "balanced": 0.25,  # a quarter of the dense bytes
    "aggressive": 0.125,  # an eighth
    "compact": 0.1,  # a tenth: about 2-bit QuantizedCache's bytes in float32
}

PRESETS: dict[str, dict] = {
    **{name: {"budget": budget} for name, budget in PRESET_BUDGETS.items()},
    # every token, 4 of 8 value groups (about 0.76 of the dense bytes): no token is ever dropped
    "groups-only": {"num_groups": 8, "keep_groups": 4, "window": 64},
    # every group kept: same tokens as DynamicCache, for checks
    "lossless": {"num_groups": 8, "keep_groups": 8, "window": 64},
}


def resolve_config(config: SubTokenConfig | str | None, fields: dict | None = None) -> SubTokenConfig:
    """A `SubTokenConfig` from a config, a preset name, or None (the defaults), with `fields`
    (`SubTokenConfig` keywords) on top of a preset or the defaults."""
    fields = fields or {}
    if isinstance(config, SubTokenConfig):
        if fields:
            raise ValueError(
                f"give either a SubTokenConfig or its fields as keywords, got both (keywords {sorted(fields)})"
            )
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"config preset must be one of {sorted(PRESETS)}, got {config!r}")
        return SubTokenConfig(**{**PRESETS[config], **fields})
    if config is None:
        return SubTokenConfig(**fields)
    raise TypeError(f"config must be a SubTokenConfig, a preset name or None, got {type(config).__name__}")
