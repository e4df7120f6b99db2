"""The house rules that a reader relies on, checked on every run (issue #12's proof).

- no import circle among first-party modules (module-level imports; ``TYPE_CHECKING``
  blocks and imports inside functions are not run at import time, so they do not count);
- no source file over 600 lines;
- no test module imports another test module (what tests share lives in ``tests/support``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = {REPO / "workloads": ("iotpipe", "iotpipe_tools"),
                REPO / "operator": ("iotpipe_operator",)}
MAX_LINES = 600


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_sources() -> dict[str, Path]:
    return {module_name(root, path): path
            for root, packages in SOURCE_ROOTS.items() for package in packages
            for path in sorted((root / package).rglob("*.py"))}


def import_time_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported (not under TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from import_time_imports(node.orelse)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            yield from import_time_imports(node.body)
            for handler in getattr(node, "handlers", []):
                yield from import_time_imports(handler.body)
            yield from import_time_imports(node.orelse)
            yield from import_time_imports(getattr(node, "finalbody", []))


def import_graph(modules: dict[str, Path], sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the first-party modules its import runs (an ancestor package always
    runs first, so importing it from inside is no edge)."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in import_time_imports(ast.parse(sources[name]).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = []
                for alias in node.names:
                    submodule = f"{origin}.{alias.name}"
                    if submodule in modules:
                        targets.append(submodule)
                    elif not f"{name}.".startswith(f"{origin}."):
                        targets.append(origin)
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_circle_check_finds_a_circle_and_ignores_type_checking() -> None:
    modules = {name: Path(f"{name}.py") for name in ("p.a", "p.b", "p.c")}
    sources = {"p.a": "from p import b\n",
               "p.b": "import p.a\n",
               "p.c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import p.a\n"}
    edges = import_graph(modules, sources)
    assert edges == {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": set()}
    assert circles(edges) == [["p.a", "p.b"]]
    assert circles({"x": {"y"}, "y": {"z"}, "z": set()}) == []


def test_no_import_circle() -> None:
    modules = first_party_sources()
    assert len(modules) > 80, SOURCE_ROOTS  # the walk found the code, not an empty folder
    edges = import_graph(modules, {name: path.read_text() for name, path in modules.items()})
    assert circles(edges) == []


def test_no_source_file_over_600_lines() -> None:
    long = {str(path.relative_to(REPO)): count for path in first_party_sources().values()
            if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these along their seams: {long}"


def test_no_test_module_imports_another() -> None:
    tests = REPO / "tests"
    test_modules = {path.stem for path in tests.rglob("test_*.py")} | {"conftest"}
    offenders = {}
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if set(n.split(".")) & test_modules]
            if bad:
                offenders[str(path.relative_to(REPO))] = bad
    assert not offenders, f"share it through tests/support instead: {offenders}"
