"""`SubTokenConfig`: the validated settings of a `SubTokenCache`."""

from __future__ import annotations

import functools
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from hf_subtok.config_checks import (
    check_backend,
    check_budget,
    check_int,
    check_key_space,
    check_quantization,
)
from hf_subtok.config_overrides import LayerOverride
from hf_subtok.formats import (
    KEY_LAYOUTS,
    VALUE_CLIPS,
    StorageFormat,
    keep_groups_for,
    key_layout_for,
    storage_format,
    storage_formats,
)
from hf_subtok.quant import SUPPORTED_BITS
from hf_subtok.scorers import available_group_scorers, available_token_scorers

MAX_GROUPS = 256
AXES = ("both", "tokens", "groups")
LAYER_BUDGETS = ("adaptive", "uniform")
SPANS = ("fixed", "adaptive")
HEAD_BUDGETS = ("uniform", "adaptive")
RECIPE_MODES = ("auto", None)


@dataclass
class SubTokenConfig:
    """How a `SubTokenCache` stores each layer.

    Keys of every stored token are kept whole. Each value vector `[D]` is split into
    `num_groups` groups of `D / num_groups` channels; `keep_groups` of them are stored per
    token, chosen by the group router `router`. The newest `window` tokens stay dense and are
    packed `pack_chunk` tokens at a time when the window overflows.

    Fields hold what the user gave (None where a default is derived), so `dataclasses.replace`
    and `to_dict` round trips keep their meaning; the values in force are the properties
    `groups_kept` (K without a budget: `num_groups // 2`) and `chunk_tokens` (`window // 2`).

    Without `budget`, every token is kept with `keep_groups` groups. With `budget` (target
    stored/dense byte ratio) the cache spends it per layer on tokens (chosen per KV head by
    `token_scorer` from the prompt's last `obs_window` queries) and value groups jointly
    (`axes="both"`; `keep_groups`, if given, fixes K), on tokens only (`axes="tokens"`, K = G)
    or on groups only (`axes="groups"`: the largest K that fits; budgets below about
    `(1 + 1/num_groups) / 2` are then unreachable and raise `ValueError`).

    `budget` alone is enough: with `recipe="auto"` (the default), a budget below 1 and
    `axes="both"`, every field you did not set takes the value of the measured-best recipe for
    that budget and the model's dtype, from the table in `hf_subtok.recipes` (tokens, groups,
    bits, rotation, key layout, window); the fields you set win. `recipe=None` uses every field
    as written (with the defaults below: token eviction in the model's dtype).

    With `bits`, packed keys and value groups are stored quantized; the dense window stays in
    the model's dtype. Value groups get a scale and zero per token and `quant_group_size`
    channels. Keys get either the same (`key_quantization="token"`) or a scale and zero per
    channel and block of `key_block` tokens, the first `key_sinks` tokens of the prompt a block
    each (attention sinks, kept near exact) (`"channel"`, `hf_subtok.quant.channel`); the
    default `"auto"` takes channel at 2 bits and token at 4 and 8, as measured best
    (`formats.CHANNEL_KEYS_AT_BITS`). `key_clip` codes each such (channel, block) over the
    range of least squared error instead of its min/max range. With `value_codes`, value
    groups are stored below one bit per element: each token's group scaled by one number and
    cut into pieces of `code_piece` channels, each piece the index of the nearest of
    `value_codes` codewords that k-means fits per KV head (and slot) on the first tokens packed
    (`hf_subtok.quant.codebook`); keys keep `bits`. `log_scales` stores the per-channel keys'
    scales (`"keys"`), the codeword values' per-token scales (`"values"`) or both as 8-bit
    logarithms (`quant.logscale`): one byte each instead of two.

    `span="adaptive"` lets the number of groups vary per token: a layer keeping K < G groups
    also stores the other groups of the tokens most worth it (attention times the norm of the
    groups dropped), as many as its plan finds worth their bytes (`hf_subtok.storage.wide`);
    `"fixed"` keeps K groups for every token of a layer.

    `head_budgets="adaptive"` lets the KV heads of a layer keep different numbers of tokens:
    their packed tokens share one row per sequence, chosen by score across heads (each head
    keeps at least `allocation.HEAD_FLOOR` of an equal share), each naming its head in one
    byte; `"uniform"` keeps as many tokens in every head (each head its own best).

    `layer_budgets="adaptive"` shares the bytes among layers by the attention the prompt
    showed (see `hf_subtok.allocation.planner`); `"uniform"` gives every layer `budget`.
    `overrides` give layer ranges another budget, token scorer, router or precision (`LayerOverride`).
    """

    num_groups: int = field(
        default=8, metadata={"help": "value groups per head (must divide head_dim)"}
    )
    keep_groups: int | None = field(
        default=None,
        metadata={"help": "groups stored per token, 1..num_groups (None: from budget)"},
    )
    budget: float | None = field(
        default=None,
        metadata={
            "help": "target stored/dense byte ratio in (0, 1]; 1.0 keeps every token and group, losslessly "
            "(None: from keep_groups)"
        },
    )
    window: int = field(default=64, metadata={"help": "newest tokens kept dense (>= 0)"})
    pack_chunk: int | None = field(
        default=None,
        metadata={
            "help": "tokens packed at once when the window overflows (None: max(1, window // 2))"
        },
    )
    floor_tokens: int = field(
        default=128,
        metadata={
            "help": "contexts of at most this many tokens are kept exactly (no eviction, no quantization, no "
            "dropped groups); above it each layer may hold max(budget x dense bytes, this many dense tokens' bytes)"
        },
    )
    router: str = field(default="value_norm", metadata={"help": "registered group scorer name"})
    token_scorer: str = field(
        default="snapkv",
        metadata={"help": "registered token scorer deciding which tokens survive (with budget)"},
    )
    axes: str = field(
        default="both",
        metadata={
            "help": "what a budget may cut: 'both' tokens and groups, 'tokens' only, 'groups' only"
        },
    )
    obs_window: int = field(
        default=32, metadata={"help": "last prompt queries observed to score tokens"}
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": "attention kernels: 'auto' (Triton on CUDA, PyTorch otherwise), 'torch' or 'triton'"
        },
    )
    bits: int | str | None = field(
        default=None,
        metadata={
            "help": "stored keys and value groups in 8, 4 or 2 bits (None: the model's dtype; "
            "'auto': each layer's plan picks, with a budget that evicts tokens)"
        },
    )
    quant_group_size: int = field(
        default=32,
        metadata={
            "help": "channels sharing a scale and zero (at most a key's or a value group's width)"
        },
    )
    key_quantization: str = field(
        default="auto",
        metadata={
            "help": "quantized keys: 'channel' (scales per channel and block of key_block tokens), "
            "'token' (as values) or 'auto' (channel at 2 bits, token at 4 and 8)"
        },
    )
    key_block: int = field(
        default=32,
        metadata={"help": "tokens sharing a key channel's scale and zero (key_quantization='channel')"},
    )
    value_clip: str = field(
        default="auto",
        metadata={
            "help": "quantized value groups over the range of least squared error ('on'), their min/max range "
            "('off'), or 'auto' (on at 2 bits, where it measured better)"
        },
    )
    key_clip: bool = field(
        default=False,
        metadata={
            "help": "per-channel quantized keys over each block's range of least squared error per channel "
            "(outliers clamped) instead of its min/max range"
        },
    )
    value_codes: int | None = field(
        default=None,
        metadata={
            "help": "store value groups as indices into a per-head codebook of this many words (2..256), "
            "fitted by k-means when the prompt is packed, with one scale per token (None: scalar bits)"
        },
    )
    code_piece: int = field(
        default=4, metadata={"help": "value channels per codeword (value_codes)"}
    )
    log_scales: str = field(
        default="none",
        metadata={
            "help": "store per-channel key scales ('keys'), codeword values' per-token scales ('values') or "
            "both ('both') as 8-bit logarithms, one byte instead of two ('none': float)"
        },
    )
    rotate: bool = field(
        default=False,
        metadata={
            "help": "store quantized keys and value groups Hadamard-rotated (head_dim and group width powers of 2)"
        },
    )
    key_space: str = field(
        default="post_rope",
        metadata={
            "help": "'pre_rope': per-channel quantized keys are stored before RoPE and rotated at attention "
            "(hf_subtok.quant.pre_rope_keys); 'post_rope': as the model hands them over"
        },
    )
    key_bases: str | None = field(
        default=None,
        metadata={
            "help": "with key_space='pre_rope': folder or Hub id of bases from `hf-subtok calibrate --key-space "
            "pre_rope`, keys stored as coefficients in them (None: in their own channels)"
        },
    )
    key_sinks: int = field(
        default=4,
        metadata={
            "help": "first stored tokens whose per-channel quantized keys get a block each (attention sinks)"
        },
    )
    span: str = field(
        default="fixed",
        metadata={
            "help": "'adaptive': the best tokens of a layer keep every value group, the rest K; 'fixed': K for all"
        },
    )
    head_budgets: str = field(
        default="uniform",
        metadata={
            "help": "'adaptive': KV heads keep different numbers of tokens (by score across heads); 'uniform': equal"
        },
    )
    layer_budgets: str = field(
        default="uniform",
        metadata={
            "help": "'adaptive': layers get bytes by prefill attention evidence; 'uniform': equal shares"
        },
    )
    recipe: str | None = field(
        default="auto",
        metadata={
            "help": "'auto': with a budget below 1 (and axes='both'), the fields you leave unset take the "
            "measured-best recipe for that budget and the model's dtype (hf_subtok.recipes); 'none': every "
            "field as written"
        },
    )
    overrides: list = field(
        default_factory=list,
        metadata={
            "help": "LayerOverride (or dicts like {'layers': '0-3', 'budget': 0.5}) for layer ranges"
        },
    )

    def __post_init__(self) -> None:
        if self.recipe not in RECIPE_MODES:
            raise ValueError(f"recipe must be one of {RECIPE_MODES}, got {self.recipe!r}")
        check_int("num_groups", self.num_groups, 1, MAX_GROUPS)
        if self.keep_groups is not None:
            check_int("keep_groups", self.keep_groups, 1, self.num_groups)
        if self.budget is not None:
            check_budget("budget", self.budget)
        check_int("window", self.window, 0, None)
        check_int("floor_tokens", self.floor_tokens, 0, None)
        if self.pack_chunk is not None:
            check_int("pack_chunk", self.pack_chunk, 1, None)
            if self.window > 0 and self.pack_chunk > self.window:
                raise ValueError(
                    f"pack_chunk must be at most window={self.window}, got {self.pack_chunk}"
                )
        if self.router not in available_group_scorers():
            raise ValueError(
                f"router must be one of {sorted(available_group_scorers())}, got {self.router!r}"
            )
        if self.token_scorer not in available_token_scorers():
            raise ValueError(
                f"token_scorer must be one of {sorted(available_token_scorers())}, got {self.token_scorer!r}"
            )
        if self.axes not in AXES:
            raise ValueError(f"axes must be one of {AXES}, got {self.axes!r}")
        check_int("obs_window", self.obs_window, 1, None)
        check_backend(self.backend)
        if self.bits not in (None, "auto") and (
            isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS
        ):
            raise ValueError(
                f"bits must be one of {SUPPORTED_BITS}, 'auto' or None, got {self.bits!r}"
            )
        check_int("quant_group_size", self.quant_group_size, 1, None)
        if self.key_quantization not in ("auto", *KEY_LAYOUTS):
            raise ValueError(
                f"key_quantization must be one of {('auto', *KEY_LAYOUTS)}, got {self.key_quantization!r}"
            )
        check_int("key_block", self.key_block, 1, None)
        if self.value_clip not in VALUE_CLIPS:
            raise ValueError(f"value_clip must be one of {VALUE_CLIPS}, got {self.value_clip!r}")
        check_int("key_sinks", self.key_sinks, 0, None)
        # with bits left to the recipe, the fields that need bits are checked once it has filled them
        awaits_bits = self.bits is None and "bits" not in self.given_fields and self._takes_a_recipe()
        check_quantization(self, key_layout_for(self.key_quantization, self.bits), awaits_bits)
        if self.layer_budgets not in LAYER_BUDGETS:
            raise ValueError(
                f"layer_budgets must be one of {LAYER_BUDGETS}, got {self.layer_budgets!r}"
            )
        if self.span not in SPANS:
            raise ValueError(f"span must be one of {SPANS}, got {self.span!r}")
        if self.span == "adaptive" and (not self.evicts_tokens or self.axes != "both" or self.num_groups < 2):
            raise ValueError(
                "span='adaptive' needs budget=, axes='both' and num_groups >= 2 (tokens and groups "
                f"under one budget), got budget={self.budget}, axes={self.axes!r}, num_groups={self.num_groups}"
            )
        check_key_space(self.key_space, self.key_bases, self.head_budgets, self.backend)
        if self.head_budgets not in HEAD_BUDGETS:
            raise ValueError(f"head_budgets must be one of {HEAD_BUDGETS}, got {self.head_budgets!r}")
        if self.head_budgets == "adaptive" and not self.evicts_tokens:
            raise ValueError(
                "head_budgets='adaptive' needs budget= and axes 'both' or 'tokens' (token eviction), "
                f"got budget={self.budget}, axes={self.axes!r}"
            )
        if not isinstance(self.overrides, (list, tuple)):
            raise ValueError(
                "overrides must be a list of dicts (like {'layers': '0-3', 'budget': 0.5}) or LayerOverride, "
                f"got {self.overrides!r}"
            )
        # parsed once, so that equal settings compare equal however they were written; `to_dict`
        # writes them back as dicts
        self.overrides = [LayerOverride.parse(item) for item in self.overrides]
        if any(o.budget is not None for o in self.overrides) and not self.evicts_tokens:
            raise ValueError(
                "overrides with a budget need budget= and axes 'both' or 'tokens' (token eviction)"
            )
        if self.bits == "auto" and not self.evicts_tokens:
            raise ValueError(
                "bits='auto' needs budget= and axes 'both' or 'tokens' (the plan picks the precision)"
            )

    @property
    def given_fields(self) -> frozenset[str]:
        """The fields the user set: those named when the config was built, and any whose value
        differs from its default (a copy through `dataclasses.replace` or `to_dict` names every
        field, so there only the values tell). A recipe never replaces these."""
        named = getattr(self, "_named_fields", frozenset())
        changed = {
            f.name
            for f in fields(self)
            if f.init and getattr(self, f.name) != (f.default_factory() if f.default is MISSING else f.default)
        }
        return frozenset(named | changed)

    def _takes_a_recipe(self) -> bool:
        """Whether `recipes.apply_recipe` fills the unset fields (`recipe='auto'`, a budget below 1
        spent on tokens and groups)."""
        return self.recipe == "auto" and self.budget is not None and self.budget < 1.0 and self.axes == "both"

    @property
    def groups_kept(self) -> int | None:
        """K, the value groups stored per token: `keep_groups` if given, else `num_groups // 2`
        (at least 1) without a budget, else None (the budget picks K)."""
        if self.keep_groups is not None or self.budget is not None:
            return self.keep_groups
        return self.num_groups // 2 or 1

    @property
    def chunk_tokens(self) -> int:
        """Tokens packed at once when the window overflows: `pack_chunk` if given, else
        `max(1, window // 2)`."""
        return self.pack_chunk if self.pack_chunk is not None else max(1, self.window // 2)

    def layer_settings(self, num_layers: int) -> list[SubTokenConfig]:
        """The config each of `num_layers` layers runs with, overrides applied (a later
        override wins). `budget` of a layer without a budget override is what the
        overridden layers leave of `budget * num_layers`, shared equally.

        Raises `ValueError` for an override naming a layer the model does not have, or
        overridden budgets that leave the other layers nothing or need them above 1.0.
        """
        layers = [{} for _ in range(num_layers)]
        for i, override in enumerate(self.overrides):
            try:
                chosen = override.layers(num_layers)
            except ValueError as e:
                raise ValueError(f"overrides[{i}]: {e}") from None
            for layer in chosen:
                layers[layer].update(override.settings())
        fixed = [c["budget"] for c in layers if "budget" in c]
        if fixed and len(fixed) < num_layers:
            rest = (self.budget * num_layers - sum(fixed)) / (num_layers - len(fixed))
            if rest <= 0:
                raise ValueError(
                    f"overrides fix budgets summing to {sum(fixed):.3f} over {len(fixed)} layers, leaving "
                    f"nothing of budget={self.budget} x {num_layers} layers for the other layers"
                )
            if rest > 1.0:
                raise ValueError(
                    f"overrides {[o.to_dict() for o in self.overrides]} fix budgets summing to {sum(fixed):.3f} "
                    f"over {len(fixed)} layers; with budget={self.budget} x {num_layers} layers the other "
                    f"{num_layers - len(fixed)} layers would need budget {rest:.3f} each, above 1.0"
                )
            for changes in layers:
                changes.setdefault("budget", rest)
        return [self._layer_config(i, changes) for i, changes in enumerate(layers)]

    def _layer_config(self, layer: int, changes: dict) -> SubTokenConfig:
        try:
            return replace(self, overrides=[], **changes)
        except ValueError as e:
            raise ValueError(f"layer {layer} with the overrides' {changes}: {e}") from None

    @property
    def evicts_tokens(self) -> bool:
        """Whether tokens are evicted: a budget below 1 is set and `axes` lets it cut tokens
        (`budget=1.0` keeps every token, as `DynamicCache` does)."""
        return self.budget is not None and self.budget < 1.0 and self.axes != "groups"

    def to_dict(self) -> dict:
        """The fields as given, JSON-ready: `SubTokenConfig(**config.to_dict()) == config`."""
        return {**asdict(self), "overrides": [o.to_dict() for o in self.overrides]}

    def storage_formats(self, head_dim: int, elem_bytes: int) -> list[StorageFormat]:
        """The formats a layer may store packed tokens in (`formats.storage_formats`)."""
        return storage_formats(self, head_dim, elem_bytes)

    def storage_format(self, head_dim: int, elem_bytes: int, bits: int | str | None = "config") -> StorageFormat:
        """How a packed token is stored for a model with this `head_dim` and element size
        (`formats.storage_format`; `ValueError` if it does not fit)."""
        return storage_format(self, head_dim, elem_bytes, bits)

    def resolve_keep_groups(self, head_dim: int, elem_bytes: int) -> int:
        """`keep_groups` for a model with this `head_dim` and element size (`formats.keep_groups_for`)."""
        return keep_groups_for(self, head_dim, elem_bytes)


def _record_named_fields(cls):
    """Wrap the dataclass `__init__` of `cls` so that each instance records the fields its
    caller named (`given_fields`); a call naming every field (a copy) records none."""
    init = cls.__init__
    names = [f.name for f in fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        named = set(names[: len(args)]) | set(kwargs)
        self._named_fields = frozenset(named) if len(named) < len(names) else frozenset()
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


_record_named_fields(SubTokenConfig)
