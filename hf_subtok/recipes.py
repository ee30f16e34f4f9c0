"""The budget -> recipe table: what `SubTokenConfig(budget=b)` alone stores, per model dtype.

A recipe is the value of every storage field (tokens, groups, bits, rotation, key layout,
window) that measured best at one budget. `hf_subtok/data/recipes.json` holds one list of
recipes per table dtype, written by `hf-subtok recipes` (`hf_subtok.bench.recipe_search`) from
a benchmark run, with what each one measured and the command that produced it.

A budget between two rows takes the recipe of the row nearest to it on a log scale (below the
smallest or above the largest, that row's); the budget itself is the user's. A bfloat16 or
float16 model reads the bfloat16 table, any other dtype the float32 one: the budget is a share
of the dense bytes in the model's dtype, so the same share leaves a 16-bit model half the bits.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path

import torch

from hf_subtok.config import SubTokenConfig
from hf_subtok.config_overrides import LayerOverride

logger = logging.getLogger(__name__)

TABLE_FILE = "recipes.json"
TABLE_DTYPES = ("float32", "bfloat16")
# fields that only shape quantized storage: a recipe's are dropped when the user keeps full precision
QUANTIZATION_FIELDS = frozenset({
    "rotate", "quant_group_size", "key_quantization", "key_block", "value_clip", "key_clip", "value_codes",
    "code_piece", "log_scales",
})
# what a recipe may set: every storage field and overrides by depth (`"0-25%"`), none of the
# user's run settings (budget, backend, floor_tokens) and not `recipe` itself
RECIPE_FIELDS = tuple(
    f.name for f in fields(SubTokenConfig) if f.name not in ("budget", "backend", "floor_tokens", "recipe", "axes")
)


@dataclass(frozen=True)
class Recipe:
    """One row of the table: at `budget` of the dense bytes in `dtype`, store with `fields`.

    `candidate` names the recipe of the search that won (`bench.recipe_search.CANDIDATES`) and
    `measured` what the search measured for it (needle correct/cases per setting, perplexity
    change per text, stored/dense ratio).
    """

    dtype: str
    budget: float
    candidate: str
    fields: dict
    measured: dict

    def __post_init__(self) -> None:
        unknown = sorted(set(self.fields) - set(RECIPE_FIELDS))
        if unknown:
            raise ValueError(f"recipe fields must be among {RECIPE_FIELDS}, got {unknown}")
        by_index = [o for o in self.fields.get("overrides", []) if LayerOverride.parse(o).depth is None]
        if by_index:  # a table serves models of every depth
            raise ValueError(f"recipe overrides must name layers by depth (like '0-25%'), got {by_index}")


def table_dtype(dtype: torch.dtype | str) -> str:
    """The table a model of `dtype` reads: "bfloat16" for 16-bit floats, else "float32"."""
    name = str(dtype).removeprefix("torch.")
    return "bfloat16" if name in ("bfloat16", "float16") else "float32"


def table_path() -> Path:
    """Where the shipped table lives (`hf_subtok/data/recipes.json`)."""
    return Path(str(resources.files("hf_subtok") / "data" / TABLE_FILE))


def read_table(path: str | Path) -> dict:
    """The table in the JSON file at `path` (see `parse_table`)."""
    return parse_table(json.loads(Path(path).read_text(encoding="utf-8")))


@functools.cache
def load_table() -> dict:
    """The shipped table: `{"generated": {...}, "recipes": {dtype: [Recipe, ...]}}`, rows by budget."""
    return read_table(table_path())


def parse_table(data: dict) -> dict:
    """A table from its JSON form (`ValueError` naming what is missing)."""
    if not isinstance(data, dict) or "recipes" not in data:
        raise ValueError(f"a recipe table needs a 'recipes' object, got keys {sorted(data) if isinstance(data, dict) else data!r}")
    recipes = {}
    for dtype, rows in data["recipes"].items():
        if dtype not in TABLE_DTYPES:
            raise ValueError(f"recipe table dtype must be one of {TABLE_DTYPES}, got {dtype!r}")
        parsed = [Recipe(dtype=dtype, **row) for row in rows]
        for row in parsed:  # every row must build a valid config
            SubTokenConfig(**row.fields, budget=row.budget, recipe=None)
        recipes[dtype] = sorted(parsed, key=lambda r: r.budget)
    return {"generated": data.get("generated", {}), "recipes": recipes}


def recipe_for(budget: float, dtype: torch.dtype | str) -> Recipe:
    """The recipe of the row nearest to `budget` (log scale) in `dtype`'s table."""
    rows = load_table()["recipes"].get(table_dtype(dtype))
    if not rows:
        raise ValueError(f"the recipe table has no rows for dtype {table_dtype(dtype)!r}")
    return min(rows, key=lambda r: abs(math.log(r.budget / budget)))


def apply_recipe(
    config: SubTokenConfig, dtype: torch.dtype | str, pinned=frozenset()
) -> tuple[SubTokenConfig, Recipe | None]:
    """`config` with its unset fields taken from the recipe for its budget and `dtype`.

    Nothing changes when `config.recipe` is None, the budget is unset or 1.0 (lossless), or
    `axes` limits what the budget may cut (the recipes spend it on tokens and groups both).
    The fields the user set (`config.given_fields`) and those in `pinned` keep their values;
    with `bits=None` given (full precision), the recipe's quantization fields are left out too.
    The recipe's overrides (by depth) come before the user's, which win where both set a
    layer, and lose the settings the user gave for the whole model.
    The result has `recipe=None`: it states every field in force, so it reproduces the run.

    Returns:
        `(config in force, the Recipe used or None)`.
    """
    if config.recipe is None or config.budget is None or config.budget >= 1.0 or config.axes != "both":
        return config, None
    chosen = recipe_for(config.budget, dtype)
    keep = config.given_fields | set(pinned)
    changes = {name: value for name, value in chosen.fields.items() if name not in keep | {"overrides"}}
    if changes.get("bits", config.bits) is None:  # full precision given: the recipe's quantization has no object
        changes = {name: value for name, value in changes.items() if name not in QUANTIZATION_FIELDS}
    layer_changes = _recipe_overrides(chosen, keep)
    if layer_changes:
        changes["overrides"] = layer_changes + list(config.overrides)
    try:
        resolved = replace(config, recipe=None, **changes)
    except ValueError as e:
        raise ValueError(
            f"budget={config.budget} takes the {chosen.dtype} recipe {chosen.candidate!r} ({changes}) for the "
            f"fields left unset, which conflicts with the fields given: {e}. Set recipe=None to use the "
            "fields as written"
        ) from None
    logger.info(
        "budget=%s in %s: recipe %r of the table row at %s (%s)",
        config.budget, table_dtype(dtype), chosen.candidate, chosen.budget, changes,
    )
    return resolved, chosen


def _recipe_overrides(recipe: Recipe, keep: set) -> list[LayerOverride]:
    """The recipe's overrides without the settings in `keep` (the user's), empty ones dropped."""
    out = []
    for item in recipe.fields.get("overrides", []):
        override = LayerOverride.parse(item)
        settings = {k: v for k, v in override.settings().items() if k not in keep}
        if settings:
            out.append(LayerOverride(depth=override.depth, **settings))
    return out
