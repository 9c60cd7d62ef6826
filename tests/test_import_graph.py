"""The package's imports point one way: a graph of every import in `optimum_fair` (function-level ones
included) has no cycle, and the layers import only downward."""

from __future__ import annotations

import ast
from pathlib import Path

import optimum_fair

ROOT = Path(optimum_fair.__file__).parent

# layer of each top-level module / subpackage: a module may import only from its own layer or below
LAYERS = {
    "enums": 0, "ops": 0, "grids": 0, "files": 0, "devices": 0, "naming": 0, "digests": 0, "masks": 0,
    "nn": 1, "calib": 1, "scoring": 1, "arch": 1, "distributed": 1, "config": 1,
    "modeling": 2, "data": 2,
    "pipeline": 3,
    "eval": 4,
    "export": 5,
    "integrations": 6,
    "cli": 7,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every optimum_fair module `path` imports, at any depth of its code (absolute names)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("optimum_fair")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("optimum_fair"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # a module's own ancestors are imported before it anyway: naming one is no edge
        targets = {t for t in imports_of(path) if t in modules and t != name and not name.startswith(t + ".")}
        edges[name] = targets
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `edges` as a list of names (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_function_level_imports_are_in_the_graph():
    edges = graph()
    # the lazy public names of __init__ and cli.main's imports are seen
    assert "optimum_fair.cli.actions" in edges["optimum_fair.cli.main"]
    assert len(edges) > 40


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_layers_import_downward():
    bad = []
    for src, targets in graph().items():
        if src == "optimum_fair":  # the package root names everything lazily
            continue
        for dst in targets:
            if _layer(dst) is not None and _layer(src) is not None and _layer(dst) > _layer(src):
                bad.append(f"{src} -> {dst}")
    assert not bad, "upward imports: " + ", ".join(sorted(bad))


def test_every_module_has_a_layer():
    tops = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")}
    assert tops - {"__init__"} <= set(LAYERS), sorted(tops - {"__init__"} - set(LAYERS))
