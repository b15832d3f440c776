"""No import cycles inside peftkern: the graph of module-level intra-package imports (read with ast; imports
inside functions and under `if TYPE_CHECKING:` are lazy and left out) must be acyclic, and every module must
import cleanly."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import peftkern

ROOT = Path(peftkern.__file__).parent
PKG = "peftkern"


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module and package under peftkern/."""
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module):
    """Import statements run when the module is imported: not in functions, not under `if TYPE_CHECKING:`."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If):
            todo += node.orelse if _is_type_checking(node.test) else node.body + node.orelse
        elif isinstance(node, ast.ClassDef):
            todo += node.body
        elif isinstance(node, (ast.Try, ast.With)) or type(node).__name__ == "TryStar":
            for field in ("body", "handlers", "orelse", "finalbody"):
                todo += getattr(node, field, [])
        elif isinstance(node, ast.ExceptHandler):
            todo += node.body


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]  # the package relative imports start from
        for node in _module_level_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = here.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                # `from x import y`: the submodule x.y when y is one, else x itself
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            for t in targets:
                while t and t not in mods and t.startswith(PKG + "."):  # `import peftkern.a.b` -> deepest module
                    t = t.rpartition(".")[0]
                if t in mods and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (iterative DFS, deterministic order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_cycle_finder_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_relative_and_submodule_imports():
    graph = import_graph()
    assert "peftkern.integrations.checks" in graph["peftkern.integrations.lora"]
    assert "peftkern.ops.lora" in graph["peftkern.integrations.lora"]  # from ..ops import lora
    assert "peftkern._backend" in graph["peftkern.integrations.lora"]  # from .. import _backend
    assert "peftkern.integrations.accelerate" in graph["peftkern"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _all_modules() -> list[str]:
    return [PKG] + sorted(m.name for m in pkgutil.walk_packages(peftkern.__path__, PKG + "."))


@pytest.mark.parametrize("name", _all_modules())
def test_every_module_imports(name):
    assert importlib.import_module(name).__name__ == name
