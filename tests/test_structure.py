"""The package's shape: no import cycle anywhere in fma_fast, the solve reaches its kernels in
a few modules, and the public names are the ones the README documents."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import fma_fast

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"fma_fast": REPO / "fma_fast", "fma_fast.kernels": REPO / "kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the fma_fast modules it imports, at any depth of its code (lazy imports too)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                submodules = [f"{base}.{alias.name}" for alias in node.names]
                # "from . import solver" needs the submodule; "from .. import x" the package
                targets = [m for m in submodules if m in modules] or [base]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return stack[stack.index(child):] + [child]
            if child not in state:
                found = visit(child)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30, f"only {len(graph)} modules found: the walk is broken"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_planted_cycle():
    graph = import_graph()
    plan, api = "fma_fast.solver.plan", "fma_fast.solver.api"
    graph[plan] = {*graph[plan], api}  # api -> ... -> plan
    assert _cycle(graph), "a planted cycle solver -> plan -> solver went unnoticed"


def _shortest(graph, start: str, goal: str) -> list[str]:
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        if path[-1] == goal:
            return path
        for child in sorted(graph[path[-1]] - seen):
            seen.add(child)
            paths.append([*path, child])
    return []


def test_solve_reaches_its_kernels_through_at_most_five_modules():
    graph = import_graph()
    for kernel in ("fma_fast.kernels.folded_step", "fma_fast.kernels.cosine_topk"):
        path = _shortest(graph, "fma_fast.solver.api", kernel)
        if not path:  # dispatch imports the scoring kernels lazily, by name
            path = _shortest(graph, "fma_fast.solver.api", "fma_fast.ops.dispatch")
            path.append(kernel)
        assert 0 < len(path) <= 5, f"{kernel}: {' -> '.join(path)}"


def test_the_library_does_not_import_the_command_line_or_the_report():
    graph = import_graph()
    core = [m for m in graph if not m.startswith(("fma_fast.cli", "fma_fast.experiments.report"))]
    for module in core:
        assert not {m for m in graph[module] if m.startswith("fma_fast.cli")}, module
        assert not {m for m in graph[module] if m.startswith("fma_fast.experiments.report")}, module


def test_every_public_name_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    missing = [name for name in fma_fast.__all__ if not re.search(rf"`[^`]*\b{name}\b", readme)]
    assert not missing, f"in fma_fast.__all__ but not in the README: {missing}"
    documented = set(re.findall(r"fma_fast\.([a-z_A-Z]+)\(", readme))
    undocumented = sorted(documented - set(fma_fast.__all__) - {"kernels"})
    assert not undocumented, f"the README calls fma_fast.{undocumented} outside __all__"
