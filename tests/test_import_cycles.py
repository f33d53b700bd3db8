"""Imports go one way: no cycle among the project's modules, and the packages keep their layering (FORBIDDEN).

A static read (ast) of every import statement, function-level ones included (a lazy import still ties the two
modules together), except those under `if TYPE_CHECKING:`. Importing `a.b.c` also runs `a` and `a.b`, so those
package modules count as imported too.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "serving", "batch_jobs", "sdserve", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imported_names(path: Path, module: str) -> list[str]:
    """Every dotted name an import statement of `path` loads (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.append(prefix)
            names.extend(f"{prefix}.{a.name}" for a in node.names if a.name != "*")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (directly, with the packages those imports run)."""
    mods = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for name in imported_names(path, mod):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                # A module's own ancestors are loaded before it: importing them again is no edge.
                if target in mods and target != mod and not mod.startswith(target + "."):
                    graph[mod].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles as paths a -> ... -> a: in each strongly connected component, a shortest one through each module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the graph is small, recursion depth is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles: list[list[str]] = []
    for comp in sccs:
        for start in comp:
            c = _cycle_through(graph, set(comp), start)
            i = c.index(min(c[:-1]))  # rotate to the smallest name so one cycle is reported once
            c = c[i:-1] + c[:i] + [c[i]]
            if c not in cycles:
                cycles.append(c)
    return cycles


def _cycle_through(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """A shortest path from `start` back to itself inside its component (breadth-first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in no cycle of its component")


def test_finder_sees_a_cycle():
    # The checker itself must be able to fail.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50, "the scan found too few modules to be meaningful"
    cycles = find_cycles(graph)
    for c in cycles:
        print("import cycle: " + " -> ".join(c))
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges, {len(cycles)} cycles")
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


# Package -> top-level names its modules must never import (directly or lazily). Each package's __init__.py says
# what it owns and may import; sdserve (the CLI on top) may import everything.
FORBIDDEN = {
    "core": {"ray", "serving", "batch_jobs", "sdserve", "benchmarks"},
    "serving": {"batch_jobs", "sdserve", "benchmarks"},
    "batch_jobs": {"serving", "sdserve", "benchmarks"},
    "benchmarks": {"sdserve"},
}


def layering_violations() -> list[str]:
    out = []
    for mod, path in project_modules().items():
        banned = FORBIDDEN.get(mod.split(".")[0], set())
        for name in imported_names(path, mod):
            if name.split(".")[0] in banned:
                out.append(f"{mod} imports {name}")
    return sorted(set(out))


def test_packages_import_only_the_layers_below():
    bad = layering_violations()
    assert not bad, "layering violations:\n" + "\n".join(bad)
