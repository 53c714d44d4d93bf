"""The modules of each package import one another without a circle.

Read from the source with `ast`, so that every import counts: at module level, inside functions
(the lazy ones that keep a library off import time) and under `TYPE_CHECKING`. A circle hidden in a
function runs fine until the day someone moves the import to the top, or imports the modules in
another order; the SNMP driver and its two backends once formed one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def module_files(package: str) -> dict[str, Path]:
    """Every module of `package` (dotted name → file), the package itself as its `__init__`."""
    out: dict[str, Path] = {}
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that the module `name` (at `path`) names in any import.

    `from a.b import c` counts as an import of `a.b.c` when that is a module, else of `a.b`. A
    package's `__init__` that Python runs on the way to a submodule is not counted: only what
    the source names.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                found.add(submodule if submodule in known else module)
    return {module for module in found if module in known and module != name}


def import_graph(package: str) -> dict[str, set[str]]:
    files = module_files(package)
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph` as `[a, b, ..., a]`, or None. Iterative depth-first search."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path = [start]
        on_path = {start}
        stack = [iter(sorted(graph[start]))]
        while stack:
            following = next(stack[-1], None)
            if following is None:
                stack.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif following in on_path:
                return [*path[path.index(following) :], following]
            elif following not in done:
                path.append(following)
                on_path.add(following)
                stack.append(iter(sorted(graph[following])))
    return None


def test_find_cycle_finds_a_circle_through_several_modules() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"c"}}) is None


def test_imports_inside_functions_and_relative_imports_are_read(tmp_path: Path) -> None:
    source = "def f():\n    from .b import g\n    from pkg import c\n"
    path = tmp_path / "a.py"
    path.write_text(source)
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    assert imported_modules("pkg.a", path, known) == {"pkg.b", "pkg.c"}


@pytest.mark.parametrize("package", ["poller.drivers", "poller", "satellite"])
def test_no_import_cycle(package: str) -> None:
    graph = import_graph(package)
    assert len(graph) > 1, f"no modules found for {package}"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
