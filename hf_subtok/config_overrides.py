"""`LayerOverride`: settings for a range of layers that differ from the rest of a `SubTokenConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from hf_subtok.config_checks import check_budget, check_int, parse_depth_range, parse_layer_range
from hf_subtok.quant import SUPPORTED_BITS
from hf_subtok.scorers import available_group_scorers, available_token_scorers


@dataclass(frozen=True)
class LayerOverride:
    """Settings for a range of layers that differ from the rest.

    The range is either `first..last` (inclusive layer indices) or `depth=(low, high)`: the
    layers `i` of an `n`-layer model with `low <= i / n < high`, written `"0-25%"` in the dict
    form (the first quarter of the layers, whatever the model's depth: what a recipe of
    `hf_subtok.recipes` may carry, since it serves models of every depth).
    `budget` fixes those layers' share of the dense bytes (the other layers share what is
    left of the overall budget); `token_scorer` and `router` pick other registered scorers;
    `bits` another precision for their packed tokens (2, 4, 8 or "auto": early layers, whose
    errors every later layer reads, may want more bits than the rest). None leaves a setting as
    the config has it.
    """

    first: int | None = None
    last: int | None = None
    budget: float | None = None
    token_scorer: str | None = None
    router: str | None = None
    bits: int | str | None = None
    depth: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.depth is None:
            check_int("first", self.first, 0, None)
            check_int("last", self.last, self.first, None)
        else:
            if self.first is not None or self.last is not None:
                raise ValueError(
                    f"an override names its layers by first/last or by depth, not both; got first={self.first!r}, "
                    f"last={self.last!r}, depth={self.depth!r}"
                )
            low, high = parse_depth_range(self.depth)
            object.__setattr__(self, "depth", (low, high))
        if self.budget is not None:
            check_budget("override budget", self.budget)
        if self.token_scorer is not None and self.token_scorer not in available_token_scorers():
            raise ValueError(
                f"override token_scorer must be one of {sorted(available_token_scorers())}, got {self.token_scorer!r}"
            )
        if self.bits is not None and (isinstance(self.bits, bool) or self.bits not in (*SUPPORTED_BITS, "auto")):
            raise ValueError(f"override bits must be one of {SUPPORTED_BITS} or 'auto', got {self.bits!r}")
        if self.router is not None and self.router not in available_group_scorers():
            raise ValueError(
                f"override router must be one of {sorted(available_group_scorers())}, got {self.router!r}"
            )

    @classmethod
    def parse(cls, item: LayerOverride | dict) -> LayerOverride:
        """An override from itself or a dict such as `{"layers": "0-3", "budget": 0.5}`."""
        if isinstance(item, LayerOverride):
            return item
        if not isinstance(item, dict):
            raise ValueError(f"overrides items must be LayerOverride or dict, got {item!r}")
        item = dict(item)
        if "layers" in item:
            layers = item.pop("layers")
            if isinstance(layers, str) and layers.strip().endswith("%"):
                item.setdefault("depth", parse_depth_range(layers))
            else:
                first, last = parse_layer_range(layers)
                item.setdefault("first", first)
                item.setdefault("last", last)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(item) - known)
        if unknown:
            raise ValueError(
                f"overrides item has unknown field(s) {unknown}; known: layers, {sorted(known)}"
            )
        return cls(**item)

    def layers(self, num_layers: int) -> range:
        """The layers of a `num_layers`-layer model this override sets (`ValueError` if it names
        a layer the model lacks, or, by depth, none at all)."""
        if self.depth is None:
            if self.last >= num_layers:
                raise ValueError(
                    f"names layers {self.first}..{self.last}, but the model has "
                    f"{num_layers} layers (0..{num_layers - 1})"
                )
            return range(self.first, self.last + 1)
        low, high = self.depth
        chosen = [i for i in range(num_layers) if low <= i / num_layers < high]
        if not chosen:
            raise ValueError(f"{self.to_dict()['layers']} names no layer of a {num_layers}-layer model")
        return range(chosen[0], chosen[-1] + 1)

    def settings(self) -> dict:
        """The settings it changes (the fields that are not None, the range left out)."""
        return {k: v for k, v in asdict(self).items() if k not in ("first", "last", "depth") and v is not None}

    def to_dict(self) -> dict:
        """The compact dict `parse` reads back, e.g. `{"layers": "0-3", "budget": 0.5}` or
        `{"layers": "0-25%", "bits": 4}`."""
        if self.depth is not None:
            layers = f"{100 * self.depth[0]:g}-{100 * self.depth[1]:g}%"
        else:
            layers = self.first if self.first == self.last else f"{self.first}-{self.last}"
        return {"layers": layers, **self.settings()}
