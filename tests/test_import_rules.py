"""The package's import structure: no import cycles among hf_subtok modules, the design's
never-rules (DESIGN.md, "Layout"), and no file above MAX_LINES lines.

Imports are read with `ast` from every module: `import x` and `from x import y`, relative ones,
those inside functions, and those under `if TYPE_CHECKING:`. TYPE_CHECKING-only imports never
run, so they do not make cycles; they still count for the never-rules (a type named in a
signature is a dependency of the design). The same idea as ../shared/tools/structure_check.py,
kept self-contained here.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hf_subtok"
MAX_LINES = 450

# Module prefixes of each part of the design; a prefix covers the module and everything below
# it (`hf_subtok.storage` also covers a future `hf_subtok/storage/` package). Update these
# lists when files move.
SCORERS = ["hf_subtok.scorers"]
ALLOCATOR = ["hf_subtok.allocation"]
PLANNER = ["hf_subtok.allocation.planner"]
STORAGE_LAYER = ["hf_subtok.storage.layer"]  # the layer (transformers' CacheLayerMixin contract)
STORAGE_ENCODERS = ["hf_subtok.storage.tensors"]  # how kept units become stored tensors
# what a layer hands to attention; kernels take these as their input
KV_VIEWS = ["hf_subtok.views"]
STORAGE = ["hf_subtok.storage"] + KV_VIEWS
KERNELS = ["hf_subtok.kernels"]
CACHE = ["hf_subtok.cache", "hf_subtok.attention"]

# (id, importers, forbidden imports); "transformers" names the external package.
NEVER_RULES = {
    "scorers-never-import-storage": (SCORERS, STORAGE),
    "kernels-never-import-transformers-or-the-cache": (
        KERNELS,
        ["transformers"] + CACHE + [m for m in STORAGE if m not in KV_VIEWS],
    ),
    "storage-never-imports-scorers-or-the-allocator": (STORAGE, SCORERS + ALLOCATOR),
    "allocator-never-imports-storage-encoders": (ALLOCATOR, STORAGE_ENCODERS),
    # "the planner calls into layers" is a never-rule: it may not depend on the layer class
    "planner-never-imports-the-layer": (PLANNER, STORAGE_LAYER),
}

# Checks the current code fails, each expected to fail until the refactor fixes it; strict, so
# a fixed check fails here until its mark is removed.
KNOWN_VIOLATIONS = {
}


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str  # module name
    target: str  # an hf_subtok module, or the dotted name of an external one
    line: int
    type_checking: bool

    def where(self, root: Path) -> str:
        return f"{module_path(root, self.importer)}:{self.line}"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(root: Path, name: str) -> str:
    for path in (
        root / name.replace(".", "/") / "__init__.py",
        root / (name.replace(".", "/") + ".py"),
    ):
        if path.exists():
            return str(path.relative_to(root))
    return name


def modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    return {module_name(root, p): p for p in sorted((root / package).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _raw_imports(tree: ast.AST, package: str):
    """(dotted names, line, under TYPE_CHECKING) of every import statement, at any depth.
    `from x import y` gives both `x.y` and `x` (y may be a submodule or a name in x)."""

    def visit(node: ast.AST, type_checking: bool):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield [alias.name], node.lineno, type_checking
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                yield [f"{source}.{alias.name}", source], node.lineno, type_checking
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, True)
            for child in node.orelse:
                yield from visit(child, type_checking)
        else:
            for child in ast.iter_child_nodes(node):
                yield from visit(child, type_checking)

    yield from visit(tree, False)


def read_imports(root: Path, package: str = PACKAGE) -> list[Import]:
    """Every import of every module of `package`, internal ones resolved to the most specific
    module that exists (`from hf_subtok.scorers import PRIORITY` -> `hf_subtok.scorers`)."""
    known = modules(root, package)
    out = []
    for name, path in known.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for candidates, line, type_checking in _raw_imports(ast.parse(path.read_text()), pkg):
            target = candidates[-1]
            for candidate in candidates:  # the longest existing prefix of the first candidate
                parts = candidate.split(".")
                while parts and ".".join(parts) not in known:
                    parts.pop()
                if parts:
                    target = ".".join(parts)
                    break
            out.append(Import(name, target, line, type_checking))
    return sorted(set(out), key=lambda i: (i.importer, i.line, i.target))


def _covered(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def never_rule_violations(
    imports: list[Import], importers: list[str], forbidden: list[str], root: Path
) -> list[str]:
    return [
        f"{i.where(root)}: {i.importer} imports {i.target}"
        + (" (TYPE_CHECKING)" if i.type_checking else "")
        for i in imports
        if _covered(i.importer, importers) and _covered(i.target, forbidden)
    ]


def import_cycles(imports: list[Import], root: Path, package: str = PACKAGE) -> list[str]:
    """One concrete cycle per strongly connected group of modules (runtime imports only), as
    `a -> b (a.py:3) -> a (b.py:7)`."""
    graph: dict[str, dict[str, Import]] = {}
    for i in imports:
        if not i.type_checking and _covered(i.target, [package]) and i.target != i.importer:
            graph.setdefault(i.importer, {}).setdefault(i.target, i)
            graph.setdefault(i.target, {})
    cycles = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        start = min(component)
        path = _path_back(graph, start, component)
        steps = " -> ".join(f"{edge.target} ({edge.where(root)})" for edge in path)
        cycles.append(f"{start} -> {steps}")
    return sorted(cycles)


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on deep chains)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _path_back(graph, start: str, component: set[str]) -> list[Import]:
    """Shortest cycle through `start` inside `component` (breadth first), as its edges."""
    came_from: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target, edge in sorted(graph[node].items()):
                if target not in component:
                    continue
                if target == start:
                    path = [edge]
                    while path[0].importer != start:
                        path.insert(0, came_from[path[0].importer])
                    return path
                if target not in came_from:
                    came_from[target] = edge
                    following.append(target)
        frontier = following
    raise AssertionError(f"{start} is on no cycle of {sorted(component)}")


def oversized_files(root: Path, package: str = PACKAGE, limit: int = MAX_LINES) -> list[str]:
    sizes = ((len(p.read_text().splitlines()), p) for p in modules(root, package).values())
    return [
        f"{p.relative_to(root)}: {n} lines (> {limit})"
        for n, p in sorted(sizes, reverse=True)
        if n > limit
    ]


def findings(check: str, root: Path = ROOT) -> list[str]:
    if check == "no-import-cycles":
        return import_cycles(read_imports(root), root)
    if check == "file-sizes":
        return oversized_files(root)
    importers, forbidden = NEVER_RULES[check]
    return never_rule_violations(read_imports(root), importers, forbidden, root)


def _param(check: str):
    if check not in KNOWN_VIOLATIONS:
        return check
    reason = f"issue 20: {KNOWN_VIOLATIONS[check]}"
    return pytest.param(check, marks=pytest.mark.xfail(strict=True, reason=reason))


CHECKS = ["no-import-cycles", *NEVER_RULES, "file-sizes"]


@pytest.mark.parametrize("check", [_param(c) for c in CHECKS])
def test_package_structure(check):
    found = findings(check)
    assert not found, f"{check}:\n  " + "\n  ".join(found)


def test_known_violations_name_real_checks():
    assert set(KNOWN_VIOLATIONS) <= set(CHECKS)


# --- the checker itself, on a small package written here -------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_reader_resolves_relative_nested_and_type_checking_imports(tmp_path):
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.sub import thing\n",
            "pkg/sub/__init__.py": "from .leaf import thing\n",
            "pkg/sub/leaf.py": (
                "from typing import TYPE_CHECKING\n"
                "import transformers.cache_utils\n"
                "if TYPE_CHECKING:\n    from ..top import Top\nelse:\n    import pkg.other\n"
                "def f():\n    from .. import top\n"
                "thing = 1\n"
            ),
            "pkg/top.py": "class Top: ...\n",
            "pkg/other.py": "",
        },
    )
    got = {(i.importer, i.target, i.type_checking) for i in read_imports(root, "pkg")}
    assert got == {
        ("pkg", "pkg.sub", False),
        ("pkg.sub", "pkg.sub.leaf", False),
        ("pkg.sub.leaf", "typing", False),
        ("pkg.sub.leaf", "transformers.cache_utils", False),
        ("pkg.sub.leaf", "pkg.top", True),
        ("pkg.sub.leaf", "pkg.other", False),
        ("pkg.sub.leaf", "pkg.top", False),
    }


def test_cycles_are_reported_through_function_imports_but_not_type_checking(tmp_path):
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import x\n",
            "pkg/b.py": "x = 1\ndef f():\n    from pkg import c\n",
            "pkg/c.py": "import pkg.a\n",
            "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.e import y\n",
            "pkg/e.py": "from pkg.d import TYPE_CHECKING as y\n",
        },
    )
    assert import_cycles(read_imports(root, "pkg"), root, "pkg") == [
        "pkg.a -> pkg.b (pkg/a.py:1) -> pkg.c (pkg/b.py:3) -> pkg.a (pkg/c.py:1)"
    ]


def test_never_rules_count_type_checking_imports_and_cover_subpackages(tmp_path):
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/storage/__init__.py": "",
            "pkg/storage/layer.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.scorers import S\n",
            "pkg/scorers.py": "class S: ...\n",
        },
    )
    found = never_rule_violations(read_imports(root, "pkg"), ["pkg.storage"], ["pkg.scorers"], root)
    assert found == [
        "pkg/storage/layer.py:3: pkg.storage.layer imports pkg.scorers (TYPE_CHECKING)"
    ]
    assert oversized_files(root, "pkg", limit=2) == ["pkg/storage/layer.py: 3 lines (> 2)"]
