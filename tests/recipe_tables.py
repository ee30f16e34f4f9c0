"""Installing a recipe table of a test's own in place of the shipped one."""

from __future__ import annotations

import json

from hf_subtok import recipes


def use_table(monkeypatch, data: dict) -> dict:
    """Parse `data` (a table in its JSON form, deep-copied) and make `recipes.load_table` return it."""
    table = recipes.parse_table(json.loads(json.dumps(data)))
    monkeypatch.setattr(recipes, "load_table", lambda: table)
    return table
