"""`RouterConfig`: what a learned router was trained for, and on which base model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

FORMAT_VERSION = 1
# Relative tolerance on the base model's weight norms: loose enough for bf16/fp16 copies of the
# same weights and for a merged LoRA, tight enough to tell two checkpoints apart.
FINGERPRINT_RTOL = 2e-2
# Fields a saved config.json may lack (they describe the run; nothing is built from them).
OPTIONAL_IN_FILE = ("metrics", "training")


@dataclass
class RouterConfig:
    """Identity of the base model, the budget the router was trained at, and its shape.

    Saved as `config.json` beside the router weights; `from_dict` refuses a file with a
    missing or unknown field. Every field is required in the file (the defaults are for code
    building a config) except the descriptive `metrics` and `training`: a file without
    `lora_r`, say, would otherwise load without its LoRA.
    """

    base_model: str = field(
        metadata={"help": "name or path of the base model the router was trained on"}
    )
    model_type: str = field(metadata={"help": "transformers model_type of the base model"})
    num_layers: int = field(metadata={"help": "decoder layers of the base model"})
    num_kv_heads: int = field(metadata={"help": "KV heads per layer (Hkv)"})
    head_dim: int = field(metadata={"help": "channels per head (D)"})
    base_fingerprint: list[float] = field(
        metadata={
            "help": "norms of the embedding and of every layer's k_proj weight (the model's identity)"
        }
    )
    num_groups: int = field(metadata={"help": "value groups per head (G)"})
    keep_groups: int = field(
        metadata={"help": "value groups kept per packed token (K) at the trained budget"}
    )
    budget: float = field(metadata={"help": "stored/dense byte ratio the router was trained for"})
    router_hidden: int = field(
        default=32, metadata={"help": "hidden width of the per-head group router MLP"}
    )
    selector: bool = field(
        default=True, metadata={"help": "whether a query-aware token selector is included"}
    )
    selector_hidden: int = field(
        default=16, metadata={"help": "hidden width of the token selector MLP"}
    )
    lora_r: int = field(
        default=0, metadata={"help": "LoRA rank of the adapter trained with the router (0: none)"}
    )
    metrics: dict = field(
        default_factory=dict, metadata={"help": "held-out measurements of the training run"}
    )
    training: dict = field(default_factory=dict, metadata={"help": "settings of the training run"})
    format_version: int = field(
        default=FORMAT_VERSION, metadata={"help": "layout version of the saved files"}
    )

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "num_kv_heads",
            "head_dim",
            "num_groups",
            "keep_groups",
            "router_hidden",
            "selector_hidden",
        ):
            _check_int(name, getattr(self, name), low=1)
        _check_int("lora_r", self.lora_r, low=0)
        if self.head_dim % self.num_groups:
            raise ValueError(
                f"num_groups must divide head_dim={self.head_dim}, got {self.num_groups}"
            )
        if self.keep_groups > self.num_groups:
            raise ValueError(f"keep_groups must be in 1..{self.num_groups}, got {self.keep_groups}")
        if (
            isinstance(self.budget, bool)
            or not isinstance(self.budget, (int, float))
            or not 0 < self.budget <= 1
        ):
            raise ValueError(f"budget must be a number in (0, 1], got {self.budget!r}")
        self.budget = float(self.budget)
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError(f"base_model must be a non-empty string, got {self.base_model!r}")
        if not isinstance(self.model_type, str) or not self.model_type:
            raise ValueError(f"model_type must be a non-empty string, got {self.model_type!r}")
        if (
            not isinstance(self.base_fingerprint, list)
            or len(self.base_fingerprint) != self.num_layers + 1
            or not all(
                isinstance(x, (int, float)) and math.isfinite(x) for x in self.base_fingerprint
            )
        ):
            raise ValueError(
                f"base_fingerprint must be {self.num_layers + 1} finite numbers (embedding + one per layer), "
                f"got {self.base_fingerprint!r}"
            )
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version must be {FORMAT_VERSION}, got {self.format_version!r}"
            )
        if not isinstance(self.selector, bool):
            raise ValueError(f"selector must be true or false, got {self.selector!r}")
        for name in ("metrics", "training"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a mapping, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> RouterConfig:
        """Build from a parsed `config.json`; `ValueError` names a missing or unknown field.

        Every field but `OPTIONAL_IN_FILE` must be present (see the class docstring).
        """
        if not isinstance(data, dict):
            raise ValueError(
                f"{source} must hold a JSON object with the router's fields, got a JSON "
                f"{_JSON_TYPES.get(type(data), type(data).__name__)}"
            )
        return cls(**checked_fields(cls, data, OPTIONAL_IN_FILE, source, "a router config"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_model(
        cls, model, *, num_groups: int, keep_groups: int, budget: float, **kwargs
    ) -> RouterConfig:
        """A config recording `model`'s identity and geometry."""
        identity = model_identity(model)
        return cls(
            **identity, num_groups=num_groups, keep_groups=keep_groups, budget=budget, **kwargs
        )

    def differences(self, model) -> list[str]:
        """What differs between `model` and the base model of this config (empty: it matches)."""
        found = model_identity(model)
        diffs = geometry_differences(self.to_dict(), found, "router")
        if found["head_dim"] % self.num_groups:
            diffs.append(
                f"num_groups: router {self.num_groups} does not divide the model's head_dim={found['head_dim']}"
            )
        if not diffs:
            diffs = weight_differences(self.to_dict(), found, "the router was trained on")
        return diffs


GEOMETRY_FIELDS = ("model_type", "num_layers", "num_kv_heads", "head_dim")


def geometry_differences(recorded: dict, found: dict, kind: str) -> list[str]:
    """`"field: <kind> a, model b"` for each of `GEOMETRY_FIELDS` where a recorded identity
    (`model_identity` of the base model) differs from the model's."""
    return [
        f"{name}: {kind} {recorded[name]!r}, model {found[name]!r}"
        for name in GEOMETRY_FIELDS
        if recorded[name] != found[name]
    ]


def weight_differences(recorded: dict, found: dict, what: str) -> list[str]:
    """One line naming the first of the weight norms (`base_fingerprint`) that differ beyond
    `FINGERPRINT_RTOL`, and `what` (e.g. "the router was trained on") the recorded base model;
    empty when they match. The geometries must match (same number of norms)."""
    pairs = zip(recorded["base_fingerprint"], found["base_fingerprint"], strict=True)
    mismatched = [i for i, (a, b) in enumerate(pairs) if abs(a - b) > FINGERPRINT_RTOL * max(abs(a), abs(b), 1e-12)]
    if not mismatched:
        return []
    i = mismatched[0]
    where = "embedding" if i == 0 else f"layer {i - 1} k_proj"
    return [
        f"weights: {len(mismatched)} of {len(recorded['base_fingerprint'])} weight norms differ (first: {where} "
        f"{recorded['base_fingerprint'][i]:.4g} vs {found['base_fingerprint'][i]:.4g}); "
        f"{what} {recorded['base_model']!r}, the model is {found['base_model']!r}"
    ]


def model_identity(model) -> dict:
    """Name, architecture, KV geometry and weight fingerprint of a causal LM."""
    import torch

    text_config = model.config.get_text_config(decoder=True)
    heads = text_config.num_attention_heads
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    with torch.no_grad():
        norms = [float(base.embed_tokens.weight.float().norm())]
        norms += [float(layer.self_attn.k_proj.weight.float().norm()) for layer in base.layers]
    return {
        "base_model": str(getattr(model, "name_or_path", "") or text_config.model_type),
        "model_type": text_config.model_type,
        "num_layers": text_config.num_hidden_layers,
        "num_kv_heads": getattr(text_config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
        "base_fingerprint": [round(x, 6) for x in norms],
    }


_JSON_TYPES = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def checked_fields(cls, data: dict, optional: tuple[str, ...], source: str, kind: str) -> dict:
    """`data` (a parsed `config.json`) if it names every field of dataclass `cls` but `optional`
    and nothing else; `ValueError` naming the missing or unknown fields otherwise."""
    required = [f.name for f in fields(cls) if f.name not in optional]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{source} is missing the field(s) {missing}; {kind} needs {required}")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{source} has unknown field(s) {unknown}")
    return data
