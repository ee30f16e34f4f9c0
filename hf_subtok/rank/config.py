"""`BasesConfig`: which model a set of calibrated bases belongs to, their shapes and how they were made."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from hf_subtok.routers.config import (
    checked_fields,
    geometry_differences,
    model_identity,
    weight_differences,
)

FORMAT_VERSION = 1
# where keys are projected: as the cache holds them (after RoPE), or before RoPE, un-rotated at
# each token's position (better at equal bits: `hf_subtok.rank.calibrate`)
KEY_SPACES = ("post_rope", "pre_rope")
KEY_SPACE = "post_rope"
OPTIONAL_IN_FILE = ("calibration", "metrics")


@dataclass
class BasesConfig:
    """Identity of the base model and the geometry of its bases; saved as `config.json`.

    Every field is required in the file except the descriptive `calibration` and `metrics`;
    `from_dict` refuses a missing or unknown field.
    """

    base_model: str = field(metadata={"help": "name or path of the model the bases were calibrated on"})
    model_type: str = field(metadata={"help": "transformers model_type of the base model"})
    num_layers: int = field(metadata={"help": "decoder layers (L)"})
    num_kv_heads: int = field(metadata={"help": "KV heads per layer (Hkv)"})
    head_dim: int = field(metadata={"help": "channels per head (D)"})
    base_fingerprint: list[float] = field(
        metadata={"help": "norms of the embedding and of every layer's k_proj weight (the model's identity)"}
    )
    centered: bool = field(default=True, metadata={"help": "whether coefficients are taken around the calibration mean"})
    key_space: str = field(default=KEY_SPACE, metadata={"help": "keys are projected after RoPE ('post_rope') or before it ('pre_rope')"})
    calibration: dict = field(default_factory=dict, metadata={"help": "text, tokens, window and time of the calibration"})
    metrics: dict = field(default_factory=dict, metadata={"help": "held-out reconstruction errors"})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "layout version of the saved files"})

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("base_model", "model_type"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        fingerprint = self.base_fingerprint
        if (
            not isinstance(fingerprint, list)
            or len(fingerprint) != self.num_layers + 1
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in fingerprint)
        ):
            raise ValueError(
                f"base_fingerprint must be {self.num_layers + 1} finite numbers (embedding + one per layer), got {fingerprint!r}"
            )
        if not isinstance(self.centered, bool):
            raise ValueError(f"centered must be true or false, got {self.centered!r}")
        if self.key_space not in KEY_SPACES:
            raise ValueError(f"key_space must be one of {KEY_SPACES}, got {self.key_space!r}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version must be {FORMAT_VERSION}, got {self.format_version!r}")
        for name in OPTIONAL_IN_FILE:
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a mapping, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data, source: str = "config") -> BasesConfig:
        """Build from a parsed `config.json`; `ValueError` names a missing or unknown field."""
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object with the bases' fields, got {type(data).__name__}")
        return cls(**checked_fields(cls, data, OPTIONAL_IN_FILE, source, "a bases config"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_model(cls, model, **kwargs) -> BasesConfig:
        """A config recording `model`'s identity and geometry."""
        return cls(**model_identity(model), **kwargs)

    def differences(self, model) -> list[str]:
        """What differs between `model` and the model these bases were calibrated on (empty: it matches)."""
        found = model_identity(model)
        diffs = geometry_differences(self.to_dict(), found, "bases")
        return diffs or weight_differences(self.to_dict(), found, "the bases were calibrated on")

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor of the bases file."""
        square = (self.num_layers, self.num_kv_heads, self.head_dim, self.head_dim)
        vector = (self.num_layers, self.num_kv_heads, self.head_dim)
        shapes = {}
        for part in ("key", "value"):
            shapes.update({f"{part}_basis": square, f"{part}_mean": vector, f"{part}_variance": vector})
        return shapes
