"""`LayerOverride`: settings for a range of layers that differ from the rest of a `SubTokenConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from hf_subtok.config_checks import check_budget, check_int, parse_layer_range
from hf_subtok.quant import SUPPORTED_BITS
from hf_subtok.scorers import available_group_scorers, available_token_scorers


@dataclass(frozen=True)
class LayerOverride:
    """Settings for the layers `first..last` (inclusive) that differ from the rest.

    `budget` fixes those layers' share of the dense bytes (the other layers share what is
    left of the overall budget); `token_scorer` and `router` pick other registered scorers;
    `bits` another precision for their packed tokens (2, 4, 8 or "auto": early layers, whose
    errors every later layer reads, may want more bits than the rest). None leaves a setting as
    the config has it.
    """

    first: int
    last: int
    budget: float | None = None
    token_scorer: str | None = None
    router: str | None = None
    bits: int | str | None = None

    def __post_init__(self) -> None:
        check_int("first", self.first, 0, None)
        check_int("last", self.last, self.first, None)
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
            first, last = parse_layer_range(item.pop("layers"))
            item.setdefault("first", first)
            item.setdefault("last", last)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(item) - known)
        if unknown:
            raise ValueError(
                f"overrides item has unknown field(s) {unknown}; known: layers, {sorted(known)}"
            )
        return cls(**item)

    def to_dict(self) -> dict:
        """The compact dict `parse` reads back, e.g. `{"layers": "0-3", "budget": 0.5}`."""
        layers = self.first if self.first == self.last else f"{self.first}-{self.last}"
        settings = {k: v for k, v in asdict(self).items() if k not in ("first", "last") and v is not None}
        return {"layers": layers, **settings}
