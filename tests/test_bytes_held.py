"""Bytes reported = bytes held: every tensor reachable from a `SubTokenCache`, counted once.

The walker below is deliberately independent of the code it checks: it does not ask the
cache which tensors it holds (no `stored_tensors()`, no accounting helper). It follows every
attribute, dataclass field, `__slots__` entry, list/tuple/set item and dict value reachable
from the cache object (so quantized and coded tensors are walked like any other object) and
counts each tensor's untyped storage once, by its data pointer. Tensors whose storage belongs
to the model (a parameter or buffer, e.g. the rotary frequencies the scorers read) are the
model's bytes, not the cache's, and are left out; a model or any other `nn.Module` reachable
from the cache fails the test (a cache must not keep a model alive).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import warnings
import weakref

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, StoppingCriteria, StoppingCriteriaList

from hf_subtok import SubTokenCache, SubTokenConfig
from tests.tiny_models import make_tiny_model, random_prompts

TOLERANCE = 0.01  # reported bytes within 1% of the bytes held
LONG, SHORT = 600, 20  # above the short-context floor (128 tokens) and below every window
NEW_TOKENS = 40

_LEAVES = (
    str, bytes, int, float, complex, bool, torch.dtype, torch.device, torch.Size, torch.Generator, enum.Enum,
    type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.BuiltinMethodType, weakref.ref,
    SubTokenConfig, PretrainedConfig,
)


@dataclasses.dataclass
class Held:
    """What `walk` found: `storages` maps (device, data_ptr) to (bytes, first path seen)."""

    storages: dict = dataclasses.field(default_factory=dict)
    modules: list = dataclasses.field(default_factory=list)  # paths of nn.Modules reached

    def bytes(self, exclude: set = frozenset()) -> int:
        return sum(n for key, (n, _) in self.storages.items() if key not in exclude)


def walk(root, name: str = "cache") -> Held:
    """Every tensor storage reachable from `root`, each counted once."""
    held, seen = Held(), set()
    stack = [(root, name)]
    while stack:
        obj, path = stack.pop()
        if obj is None or isinstance(obj, _LEAVES) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.nbytes():
                held.storages.setdefault((obj.device, storage.data_ptr()), (storage.nbytes(), path))
            continue
        if isinstance(obj, nn.Module):
            held.modules.append(path)
            continue
        if isinstance(obj, types.MethodType):  # a bound method keeps its object alive
            stack.append((obj.__self__, f"{path}.__self__"))
            continue
        if isinstance(obj, dict):
            stack.extend((v, f"{path}[{k!r}]") for k, v in obj.items())
            continue
        if isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(obj))
            continue
        names = []
        if dataclasses.is_dataclass(obj):
            names += [f.name for f in dataclasses.fields(obj)]
        names += list(getattr(obj, "__dict__", {}))
        for cls in type(obj).__mro__:
            slots = getattr(cls, "__slots__", ())
            names += [slots] if isinstance(slots, str) else list(slots)
        for attr in dict.fromkeys(names):
            if attr in ("__dict__", "__weakref__"):
                continue
            try:
                value = object.__getattribute__(obj, attr)
            except AttributeError:
                continue
            stack.append((value, f"{path}.{attr}"))
    return held


def model_storages(model) -> set:
    return {(t.device, t.untyped_storage().data_ptr()) for t in (*model.parameters(), *model.buffers())}


def unreported(held: Held, report: dict, exclude: set) -> list[str]:
    """The walker's tensors grouped by the name `memory_report()["parts"]` would give them
    (the path after `cache.layers[i].`), where the walker holds more than the report counts."""
    by_part: dict[str, int] = {}
    paths: dict[str, list[str]] = {}
    for key, (nbytes, path) in held.storages.items():
        if key in exclude:
            continue
        part = path.split("].", 1)[1] if path.startswith("cache.layers[") else path
        by_part[part] = by_part.get(part, 0) + nbytes
        paths.setdefault(part, []).append(f"{path} ({nbytes} B)")
    parts = report.get("parts", {})
    return [
        f"{part}: held {nbytes} B, reported {parts.get(part, 0)} B: {', '.join(sorted(paths[part]))}"
        for part, nbytes in sorted(by_part.items())
        if nbytes > parts.get(part, 0)
    ]


# Small windows and chunks so that packs happen while the 40 new tokens are decoded.
_SMALL = {"window": 16, "pack_chunk": 8}
LAYOUTS = {
    **{preset: preset for preset in ("balanced", "aggressive", "compact", "groups-only", "lossless")},
    "budget-0.25": {"budget": 0.25, **_SMALL},
    "budget-0.1": {"budget": 0.1, **_SMALL},
    "head-budgets": {"budget": 0.25, "head_budgets": "adaptive", **_SMALL},
    "adaptive-span": {"budget": 0.25, "span": "adaptive", "router": "attention_value", "num_groups": 4, **_SMALL},
    "4bit-channel-keys": {"bits": 4, "key_quantization": "channel", "keep_groups": 4, **_SMALL},
    "4bit-channel-keys-budget": {"bits": 4, "key_quantization": "channel", "budget": 0.25, **_SMALL},
    "4bit-token-keys": {"bits": 4, "key_quantization": "token", "budget": 0.25, **_SMALL},
    "value-codes": {"bits": 2, "value_codes": 16, "num_groups": 2, "budget": 0.1, **_SMALL},
    "rotate-2bit": {"bits": 2, "rotate": True, "num_groups": 2, "budget": 0.25, **_SMALL},
    "rotate-2bit-all-tokens": {"bits": 2, "rotate": True, "num_groups": 2, "keep_groups": 2, **_SMALL},
}
CASES = [pytest.param(layout, torch.float32, id=name) for name, layout in LAYOUTS.items()]
CASES += [pytest.param(LAYOUTS[name], torch.bfloat16, id=f"{name}-bf16") for name in ("balanced", "compact")]


class _Check(StoppingCriteria):
    """Called by `generate` after every forward (the prefill's first): records what the
    walker holds and what the cache reports."""

    def __init__(self, cache, exclude):
        self.cache, self.exclude, self.records = cache, exclude, []

    def __call__(self, input_ids, scores, **kwargs):
        held = walk(self.cache)
        report = self.cache.memory_report()
        self.records.append((input_ids.shape[-1] - 1, held, report))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@pytest.mark.parametrize("prompt_tokens", [LONG, SHORT], ids=["long", "short"])
@pytest.mark.parametrize("layout, dtype", CASES)
def test_reported_bytes_are_the_bytes_held(layout, dtype, prompt_tokens):
    model = make_tiny_model("llama", dtype=dtype, head_dim=32)
    config = SubTokenConfig(**{"recipe": None, **layout}) if isinstance(layout, dict) else layout  # as named
    cache = SubTokenCache(model, config)
    config = cache.config
    check = _Check(cache, model_storages(model))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # `past_key_values=` is deprecated in transformers 5.25
        model.generate(
            random_prompts(2, prompt_tokens),
            past_key_values=cache,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([check]),
        )
    assert len(check.records) == NEW_TOKENS
    floor = getattr(config, "floor_tokens", 0)
    problems = []
    for cached, held, report in check.records:
        when = "after prefill" if cached == prompt_tokens else f"after {cached - prompt_tokens} decode steps"
        if held.modules:
            problems.append(f"{when}: the cache holds nn.Module(s) at {held.modules}")
        total = held.bytes(exclude=check.exclude)
        if abs(report["stored_bytes"] - total) > TOLERANCE * total:
            problems.append(
                f"{when}: reported {report['stored_bytes']} B, held {total} B; "
                + "; ".join(unreported(held, report, check.exclude))
            )
        if report["stored_bytes"] <= 0:
            problems.append(f"{when}: the cache holds nothing of {cached} tokens")
        if report["ratio"] > 1.0 + 1e-6:
            problems.append(f"{when}: ratio {report['ratio']:.4f} above the dense bytes")
        if config.budget is not None and prompt_tokens > floor:
            # above the floor each layer may hold max(budget, floor_tokens dense tokens) of the dense bytes
            bound = max(config.budget, floor / cached) * 1.01
            if report["ratio"] > bound:
                problems.append(f"{when}: ratio {report['ratio']:.4f} above the budget bound {bound:.4f}")
    assert not problems, "\n".join(problems[:6]) + (f"\n... {len(problems) - 6} more" if len(problems) > 6 else "")


def test_walker_counts_each_storage_once_and_sees_inside_objects():
    base = torch.zeros(100)  # 400 bytes
    view = base[10:20]  # same storage
    other = torch.ones(8, dtype=torch.uint8)

    @dataclasses.dataclass(frozen=True)
    class Frozen:
        payload: torch.Tensor

    class Slotted:
        __slots__ = ("x",)

        def __init__(self, x):
            self.x = x

    class Holder:
        pass

    holder = Holder()
    holder.items = [base, (view, {"k": Frozen(other)})]
    holder.slotted = Slotted(torch.zeros(4, dtype=torch.float64))
    holder.again = holder
    holder.model = nn.Linear(2, 2)
    held = walk(holder)
    assert held.bytes() == 400 + 8 + 32
    assert held.modules == ["cache.model"]
