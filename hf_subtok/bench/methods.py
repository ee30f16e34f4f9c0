"""Which KV-cache methods a benchmark run compares, parsed from `--methods` and `--budgets`.

Grammar of one item of `--methods` (comma separated, case-insensitive):

- `dense`: transformers' `DynamicCache`, nothing compressed; `dense:prefill_chunk=N` fills it
  `N` tokens per forward (the same chunking as a chunked subtok row, see below).
- `subtok` or `subtok@B`: `SubTokenCache(SubTokenConfig(budget=B))` at every budget of
  `--budgets`, or at `B` only: what a user gets from the budget alone (the recipe table's row
  for B, `hf_subtok.recipes`); `subtok:recipe=none@B` is token eviction alone.
- `subtok:VARIANT` or `subtok:VARIANT@B`: the same with `SubTokenConfig` fields overridden
  (ablations). VARIANT is `key=value` pairs joined by `+`, any field of `SubTokenConfig`
  but `budget` (e.g. `subtok:axes=tokens@0.25`, `subtok:axes=groups+token_scorer=key_norm`),
  and/or one preset name (`subtok:balanced`, preset fields first, pairs on top). A preset
  with a budget runs at that budget unless `@B` is given. Rows are named
  `subtok[VARIANT]@B`. One pair is not a field: `prefill_chunk=N` prefills the prompt through
  the cache `N` tokens per forward (compressing as it goes, as `generate(prefill_chunk_size=N)`
  does) instead of from the shared one-shot prefill: `subtok:prefill_chunk=256@0.25`.
- `kvpress` or `kvpress:NAME` or `kvpress:NAME@B`: kvpress presses (all of `PRESSES`, or one),
  at every budget or at `B`. NAME is a key of `PRESSES` or a kvpress class name.
- `quantized`, `quantized@BITS`, `quantized:BACKEND`, `quantized:BACKEND@BITS`: transformers'
  `QuantizedCache` with backend quanto or hqq (all backends, or one) at 4 and 2 bits (or
  BITS), its defaults otherwise; `quantized:BACKEND+residual_length=32@4` also sets
  `QuantizedCache` arguments (see `quantized_methods.OPTIONS`). A backend that cannot run
  here is skipped with a logged reason. Rows are named `quantized[BACKEND]@4bit`.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# short name -> (kvpress class, inner ScorerPress class for wrappers such as AdaKV, or None)
PRESSES: dict[str, tuple[str, str | None]] = {
    "expected_attention": ("ExpectedAttentionPress", None),
    "snapkv": ("SnapKVPress", None),
    "knorm": ("KnormPress", None),
    "streaming_llm": ("StreamingLLMPress", None),
    "tova": ("TOVAPress", None),
    "adakv_expected_attention": ("AdaKVPress", "ExpectedAttentionPress"),
}
FAMILIES = ("dense", "subtok", "kvpress", "quantized")
PREFILL_CHUNK = "prefill_chunk"  # the subtok variant pair that is not a `SubTokenConfig` field


@dataclass(frozen=True)
class MethodSpec:
    """One method at one target budget (`budget` is None for `dense` and `quantized`).

    `press` is a key of `PRESSES` for the `kvpress` family. For kvpress the budget is the
    target the press is matched to; the compression ratio itself is chosen per case (see
    `hf_subtok.bench.kvpress_methods.MATCHING`). `backend` and `bits` are the `quantized`
    family's. `variant` is the canonical text of the overrides (`axes=tokens`, `balanced`,
    `residual_length=32`) and `options` the keyword arguments it resolves to, for
    `SubTokenConfig` (subtok) or `QuantizedCache` (quantized). `prefill_chunk` (subtok and
    dense): the prompt is fed through the cache this many tokens per forward.
    """

    family: str
    budget: float | None = None
    press: str | None = None
    backend: str | None = None
    bits: int | None = None
    variant: str | None = None
    options: tuple[tuple[str, object], ...] = field(default=(), hash=False)
    prefill_chunk: int | None = None

    @property
    def name(self) -> str:
        """Row name: `dense`, `subtok@0.75`, `subtok[axes=tokens]@0.25`, `snapkv@0.75`,
        `quantized[quanto]@4bit`."""
        if self.family == "dense":
            return self.label
        if self.family == "quantized":
            return f"{self.label}@{self.bits}bit"
        return self.label if self.budget is None else f"{self.label}@{self.budget:g}"

    @property
    def label(self) -> str:
        """Method label without the budget or bits: `dense`, `subtok`, `subtok[axes=tokens]`,
        `snapkv`, `quantized[quanto]`."""
        if self.family == "kvpress":
            return self.press
        if self.family == "quantized":
            inside = self.backend + (f"+{self.variant}" if self.variant else "")
            return f"quantized[{inside}]"
        return f"{self.family}[{self.variant}]" if self.variant else self.family

    @property
    def is_plain_subtok(self) -> bool:
        """`subtok@B` without overrides: the row kvpress presses are matched to."""
        return self.family == "subtok" and not self.variant


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


def parse_depths(text: str) -> list[float]:
    """`"0.1,0.5,0.9"` -> `[0.1, 0.5, 0.9]`; each depth must be a number in [0, 1]."""
    depths = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"depths must be numbers in [0, 1], got {item!r}") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"depths must be in [0, 1], got {item!r}")
        depths.append(value)
    return depths


def parse_methods(
    text: str,
    budgets: list[float],
    *,
    have_kvpress: bool | None = None,
    quant_problems: dict[str, str | None] | None = None,
) -> list[MethodSpec]:
    """Expand a `--methods` string into `MethodSpec`s, in a stable order without duplicates.

    A bare `kvpress` is dropped (with nothing else changed) when kvpress is not installed;
    a named press then raises `ValueError`, as does any unknown method, press, field or value.
    A `quantized` backend whose `quant_problems` entry is a reason (default: probed with
    `quantized_methods.backend_problem`) is skipped with that reason logged.
    """
    if have_kvpress is None:
        have_kvpress = kvpress_available()
    problems = dict(quant_problems or {})  # probed once per backend, on first use
    specs: list[MethodSpec] = []
    for item in _items(text):
        head, _, budget_text = item.partition("@")
        family, _, variant = head.partition(":")
        if family == "dense":
            chunk = _prefill_chunk(item, variant) if variant.startswith(f"{PREFILL_CHUNK}=") else None
            if budget_text or (variant and chunk is None):
                raise ValueError(f"method 'dense' takes no budget or press (only {PREFILL_CHUNK}=N), got {item!r}")
            specs.append(MethodSpec("dense", variant=None if chunk is None else f"{PREFILL_CHUNK}={chunk}",
                                    prefill_chunk=chunk))
        elif family == "subtok":
            specs.extend(_subtok_specs(item, variant, budget_text, budgets))
        elif family == "kvpress":
            item_budgets = parse_budgets(budget_text) if budget_text else budgets
            names = [press_key(variant)] if variant else list(PRESSES)
            if not have_kvpress:
                if variant:
                    raise ValueError(f"method {item!r} needs kvpress, which is not installed (pip install kvpress)")
                continue
            specs.extend(MethodSpec("kvpress", b, n) for b in item_budgets for n in names)
        elif family == "quantized":
            specs.extend(_quantized_specs(item, variant, budget_text, problems))
        else:
            raise ValueError(f"method must be one of {', '.join(FAMILIES)} (see --help), got {item!r}")
    if not specs:
        raise ValueError(f"methods must name at least one runnable method, got {text!r}")
    unique = list(dict.fromkeys(specs))
    order = {f: i for i, f in enumerate(FAMILIES)}
    press_order = {p: i for i, p in enumerate(PRESSES)}
    from hf_subtok.bench.quantized_methods import BACKENDS

    backend_order = {b: i for i, b in enumerate(BACKENDS)}
    first_seen = {label: i for i, label in reversed(list(enumerate(s.label for s in unique)))}

    def key(s: MethodSpec):
        size = -(s.bits if s.family == "quantized" else (s.budget if s.budget is not None else 2.0))
        return (order[s.family], size, press_order.get(s.press, -1), backend_order.get(s.backend, -1),
                s.variant is not None, first_seen[s.label])

    return sorted(unique, key=key)


def _subtok_specs(item: str, variant: str, budget_text: str, budgets: list[float]) -> list[MethodSpec]:
    """`subtok[:VARIANT][@B]` at `B` or at every budget (a preset's own budget first)."""
    from hf_subtok.bench.overrides import format_overrides, parse_overrides, split_top_level
    from hf_subtok.config import SubTokenConfig
    from hf_subtok.presets import PRESETS

    preset, pairs, chunk = None, [], None
    for part in split_top_level(variant, "+"):
        if part.startswith(f"{PREFILL_CHUNK}="):
            if chunk is not None:
                raise ValueError(f"method {item!r}: {PREFILL_CHUNK} is set twice")
            chunk = _prefill_chunk(item, part)
        elif "=" in part:
            pairs.append(part)
        elif part in PRESETS and preset is None:
            preset = part
        else:
            raise ValueError(f"subtok preset must be one of {', '.join(PRESETS)} (or use key=value), got {part!r}")
    overrides = parse_overrides("+".join(pairs), SubTokenConfig, what="subtok field")
    if any(name == "budget" for name, _ in overrides):
        raise ValueError(f"subtok field budget is set with @B, not budget=, got {item!r}")
    fields = {**(PRESETS[preset] if preset else {}), **dict(overrides)}
    preset_budget = fields.pop("budget", None)
    if budget_text:
        item_budgets = parse_budgets(budget_text)
    elif preset:
        item_budgets = [preset_budget]
    else:
        item_budgets = budgets
    options = tuple(fields.items())
    chunk_text = None if chunk is None else f"{PREFILL_CHUNK}={chunk}"
    canonical = "+".join(p for p in (preset, format_overrides(overrides), chunk_text) if p) or None
    for b in item_budgets:  # validate every field value now, before any model is loaded
        try:
            SubTokenConfig(**fields, **({} if b is None else {"budget": b}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"method {item!r}: {e}") from None
    return [MethodSpec("subtok", b, variant=canonical, options=options, prefill_chunk=chunk) for b in item_budgets]


def _prefill_chunk(item: str, pair: str) -> int:
    """`N` of a `prefill_chunk=N` pair: a positive integer."""
    from hf_subtok.bench.overrides import convert

    chunk = convert(PREFILL_CHUNK, pair.partition("=")[2], int, what=f"method {item!r}:")
    if chunk < 1:
        raise ValueError(f"method {item!r}: {PREFILL_CHUNK} must be >= 1, got {chunk}")
    return chunk


def _quantized_specs(item: str, variant: str, bits_text: str, problems: dict[str, str | None]) -> list[MethodSpec]:
    """`quantized[:BACKEND[+k=v...]][@BITS]`, skipping backends that cannot run here.

    `problems` maps a backend to why it cannot run (None: it runs); a backend missing from
    it is probed with `backend_problem` and added.
    """
    from hf_subtok.bench import quantized_methods as qm
    from hf_subtok.bench.overrides import convert, split_top_level

    backend, *pairs = split_top_level(variant, "+") if variant else [""]
    backends = [backend] if backend else list(qm.BACKENDS)
    if backend and backend not in qm.BACKENDS:
        raise ValueError(f"quantized backend must be one of {', '.join(qm.BACKENDS)}, got {backend!r}")
    options = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise ValueError(f"quantized option must be key=value, got {pair!r}")
        if name in options:
            raise ValueError(f"quantized option {name} is set twice, got {item!r}")
        options[name] = convert(name, raw, int, what="quantized option") if name in qm.OPTIONS else raw
    if bits_text:
        bits_list = [convert("bits", bits_text.removesuffix("bit"), int, what="quantized")]
    else:
        bits_list = list(qm.DEFAULT_BITS)
    canonical = "+".join(f"{k}={v}" for k, v in options.items()) or None
    specs = []
    for name in backends:
        for bits in bits_list:
            qm.check_settings(name, bits, options)
        if name not in problems:
            problems[name] = qm.backend_problem(name)
        problem = problems[name]
        if problem:
            logger.warning("skipping quantized[%s]: %s", name, problem)
            continue
        specs.extend(
            MethodSpec("quantized", backend=name, bits=bits, variant=canonical, options=tuple(options.items()))
            for bits in bits_list
        )
    return specs


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
    from hf_subtok.bench.overrides import split_top_level

    return [part.lower() for part in split_top_level(str(text), ",")]
