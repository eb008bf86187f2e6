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


# The stages, bottom first. A module may import its own stage and those below it, never one above.
# measure sits below schemes because a latency target times candidate models while channels are chosen;
# files sits below measure because the report reads thinning recipes and sizes compact files.
STAGES = [
    ("base", ["errors", "functional", "nn", "models", "data"]),
    ("capture", ["capture"]),
    ("rules", ["rules"]),
    ("passes", ["passes"]),
    ("files", ["files"]),
    ("measure", ["measure"]),
    ("schemes", ["schemes"]),
    ("compression", ["compression"]),
    ("opt", ["opt"]),
    ("command", ["cli", "__main__"]),
]


def stage_of(module: str) -> int:
    """The stage index of a module of fxcondensa (the package's own __init__ is the public API: on top)."""
    rel = module.removeprefix("fxcondensa").lstrip(".")
    if not rel:
        return len(STAGES)
    head = rel.split(".")[0]
    for i, (_, members) in enumerate(STAGES):
        if head in members:
            return i
    raise AssertionError(f"module {module} belongs to no stage of tests/test_layers.py: add it to STAGES")


def test_every_module_has_a_stage():
    for module in import_graph():
        stage_of(module)


def test_data_flows_one_way():
    """No module imports one of a later stage: capture -> rules -> passes -> ... -> opt -> command."""
    graph = _ignoring_package_inits(import_graph())
    back = [(m, d) for m, deps in graph.items() for d in deps if stage_of(d) > stage_of(m)]
    assert not back, "imports that run back up the stages: " + ", ".join(f"{m} -> {d}" for m, d in sorted(back))


def test_rules_never_import_passes_and_passes_never_import_schemes():
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith("fxcondensa.rules"):
            assert not [d for d in deps if d.startswith("fxcondensa.passes")], module
        if module.startswith("fxcondensa.passes"):
            assert not [d for d in deps if d.startswith("fxcondensa.schemes")], module


def test_stage_checker_finds_a_back_import():
    assert stage_of("fxcondensa.rules.api") < stage_of("fxcondensa.passes.channels")
    assert stage_of("fxcondensa.capture.graph") < stage_of("fxcondensa.rules.registry")
