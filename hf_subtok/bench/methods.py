"""Which KV-cache methods a benchmark run compares, parsed from `--methods` and `--budgets`.

Grammar of one item of `--methods` (comma separated, case-insensitive):

- `dense`: transformers' `DynamicCache`, nothing compressed.
- `subtok` or `subtok@B`: `SubTokenCache(SubTokenConfig(budget=B))` at every budget of
  `--budgets`, or at `B` only.
- `kvpress` or `kvpress:NAME` or `kvpress:NAME@B`: kvpress presses (all of `PRESSES`, or one),
  at every budget or at `B`. NAME is a key of `PRESSES` or a kvpress class name.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

# short name -> (kvpress class, inner ScorerPress class for wrappers such as AdaKV, or None)
PRESSES: dict[str, tuple[str, str | None]] = {
    "expected_attention": ("ExpectedAttentionPress", None),
    "snapkv": ("SnapKVPress", None),
    "knorm": ("KnormPress", None),
    "streaming_llm": ("StreamingLLMPress", None),
    "tova": ("TOVAPress", None),
    "adakv_expected_attention": ("AdaKVPress", "ExpectedAttentionPress"),
}
FAMILIES = ("dense", "subtok", "kvpress")


@dataclass(frozen=True)
class MethodSpec:
    """One method at one target budget (`budget` is None for `dense`).

    `press` is a key of `PRESSES` for the `kvpress` family. For kvpress the budget is the
    target the press is matched to; the compression ratio itself is chosen per case (see
    `hf_subtok.bench.kvpress_methods.MATCHING`).
    """

    family: str
    budget: float | None = None
    press: str | None = None

    @property
    def name(self) -> str:
        """Row label: `dense`, `subtok@0.75`, `snapkv@0.75`."""
        if self.family == "dense":
            return "dense"
        base = "subtok" if self.family == "subtok" else self.press
        return f"{base}@{self.budget:g}"

    @property
    def label(self) -> str:
        """Method label without the budget: `dense`, `subtok`, `snapkv`."""
        return self.press if self.family == "kvpress" else self.family


def kvpress_available() -> bool:
    """Whether `import kvpress` can work in this environment (without importing it)."""
    return importlib.util.find_spec("kvpress") is not None


def parse_budgets(text: str) -> list[float]:
    """`"0.75,0.5"` -> `[0.75, 0.5]`; each budget must be a number in (0, 1]."""
    budgets = []
    for item in _items(text):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"budget must be a number in (0, 1], got {item!r}") from None
        if not 0.0 < value <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {item}")
        budgets.append(value)
    if not budgets:
        raise ValueError(f"budgets must name at least one budget, got {text!r}")
    return budgets


def parse_methods(text: str, budgets: list[float], *, have_kvpress: bool | None = None) -> list[MethodSpec]:
    """Expand a `--methods` string into `MethodSpec`s, in a stable order without duplicates.

    A bare `kvpress` is dropped (with nothing else changed) when kvpress is not installed;
    a named press then raises `ValueError`, as does any unknown method or press.
    """
    if have_kvpress is None:
        have_kvpress = kvpress_available()
    specs: list[MethodSpec] = []
    for item in _items(text):
        head, _, budget_text = item.partition("@")
        item_budgets = parse_budgets(budget_text) if budget_text else budgets
        family, _, press = head.partition(":")
        if family == "dense":
            if budget_text or press:
                raise ValueError(f"method 'dense' takes no budget or press, got {item!r}")
            specs.append(MethodSpec("dense"))
        elif family == "subtok":
            if press:
                raise ValueError(f"method 'subtok' takes no press name, got {item!r}")
            specs.extend(MethodSpec("subtok", b) for b in item_budgets)
        elif family == "kvpress":
            names = [press_key(press)] if press else list(PRESSES)
            if not have_kvpress:
                if press:
                    raise ValueError(f"method {item!r} needs kvpress, which is not installed (pip install kvpress)")
                continue
            specs.extend(MethodSpec("kvpress", b, n) for b in item_budgets for n in names)
        else:
            raise ValueError(f"method must be one of {', '.join(FAMILIES)} (see --help), got {item!r}")
    if not specs:
        raise ValueError(f"methods must name at least one runnable method, got {text!r}")
    unique = list(dict.fromkeys(specs))
    order = {f: i for i, f in enumerate(FAMILIES)}
    press_order = {p: i for i, p in enumerate(PRESSES)}
    return sorted(
        unique,
        key=lambda s: (order[s.family], -(s.budget or 2.0), press_order.get(s.press, -1)),
    )


def press_key(name: str) -> str:
    """A `PRESSES` key from a short name or a kvpress class name (case-insensitive)."""
    wanted = name.strip().lower()
    for key, (cls, _inner) in PRESSES.items():
        if wanted in (key, cls.lower(), cls.lower().removesuffix("press")):
            return key
    raise ValueError(f"kvpress press must be one of {', '.join(PRESSES)}, got {name!r}")


def parse_suites(text: str, known: tuple[str, ...]) -> list[str]:
    """`"needle,ppl"` -> `["needle", "ppl"]`, each a member of `known`."""
    suites = _items(text)
    for suite in suites:
        if suite not in known:
            raise ValueError(f"suite must be one of {', '.join(known)}, got {suite!r}")
    if not suites:
        raise ValueError(f"suite must name at least one of {', '.join(known)}, got {text!r}")
    return list(dict.fromkeys(suites))


def parse_ints(name: str, text: str, low: int = 1) -> list[int]:
    """`"1024,2048"` -> `[1024, 2048]`; also accepts `1k`, `2k`."""
    values = []
    for item in _items(text):
        scale = 1024 if item.endswith("k") else 1
        try:
            value = int(item.removesuffix("k")) * scale
        except ValueError:
            raise ValueError(f"{name} must be integers (or 1k, 2k, ...), got {item!r}") from None
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {item!r}")
        values.append(value)
    return values


def _items(text: str) -> list[str]:
    return [part.strip().lower() for part in str(text).split(",") if part.strip()]
