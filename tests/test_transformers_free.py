"""The files CI runs against the newest transformers only (`conftest.TRANSFORMERS_FREE`) must
call no transformers code: none imports transformers, a model, a cache or the package's top
level (which wires the cache)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import TRANSFORMERS_FREE

TESTS = Path(__file__).parent
FORBIDDEN = ("transformers", "peft", "kvpress", "tests.tiny_models", "hf_subtok.cache", "hf_subtok.storage.layer",
             "hf_subtok.model_loading", "hf_subtok.training", "hf_subtok.bench", "hf_subtok.cli", "hf_subtok.demo")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "hf_subtok":  # `from hf_subtok import X`: the package's top level
                names |= {f"hf_subtok.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_FREE))
def test_a_transformers_free_file_imports_no_model_and_no_cache(name):
    path = TESTS / name
    assert path.exists(), f"{name} is listed in conftest.TRANSFORMERS_FREE but does not exist"
    imported = _imports(path)
    bad = sorted(m for m in imported if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    bad += sorted(m for m in imported if m in ("hf_subtok.SubTokenCache", "hf_subtok.SubTokenConfig"))
    assert not bad, f"{name} imports {bad}: it exercises transformers, so both CI legs must run it"
