"""The package's modules form layers: no import cycles, and the data flow goes one way.

Every ``import`` of a sibling module counts, at module level or inside a function: a lazy import that closes
a cycle is still a cycle (it only hides it from the interpreter).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fxcondensa"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _resolve(name, is_package, node.level, node.module)
                else:
                    base = node.module or ""
                targets.append(base)
                targets += [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _ignoring_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    # ``from .. import registry`` names the package before the module; a package's __init__ re-exports its
    # submodules. Edges into a package __init__ say nothing about layering: drop them, keep the module edges.
    inits = {m for m in graph if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}
    return {m: deps - inits for m, deps in graph.items()}


def test_no_import_cycles():
    cycles = _cycles(_ignoring_package_inits(import_graph()))
    assert not cycles, f"import cycles inside fxcondensa: {cycles}"


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_data_flows_one_way():
    """Earlier stages never import later ones: capture -> registry/rules -> analysis -> schemes -> thin -> export."""
    graph = import_graph()
    order = ["fxcondensa.records", "fxcondensa.graph", "fxcondensa.registry", "fxcondensa.passes.channels",
             "fxcondensa.passes.analysis", "fxcondensa.passes.selection", "fxcondensa.passes.slicing",
             "fxcondensa.latency_model", "fxcondensa.schemes.structured", "fxcondensa.passes.thin",
             "fxcondensa.export"]
    for i, early in enumerate(order):
        for late in order[i + 1:]:
            assert late not in graph[early], f"{early} imports {late}, a later stage"
