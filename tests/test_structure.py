"""The package's shape: which layer may import which (every import, function-local ones
included), no import cycle, the solve reaches its kernels in a few modules, and the public
names are the ones docs/api.md documents."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import fma_fast

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"fma_fast": REPO / "fma_fast", "fma_fast.kernels": REPO / "kernels"}

LAYERS = {
    "fma_fast._version": -1, "fma_fast._checkout": -1,  # the package's version; kernels/ mapping
    # layer 0: policies, names, checks, the network, the reference, protocol, torchrun, machine
    "fma_fast.core": 0,
    # layer 1: the Triton kernels, files, and the ops that choose a kernel or its torch twin
    "fma_fast.kernels": 1, "fma_fast.io": 1, "fma_fast.ops": 1,
    "fma_fast.solver": 2,  # solve, select_steps: routing, plan, runtimes, sharded solves
    "fma_fast.train": 3,  # fit
    "fma_fast.batch": 4,  # score: the resumable batch job
    "fma_fast.experiments": 5,  # synthetic tasks, baselines, adaptive stopping, the report
    "fma_fast.clip": 6,  # encoders, datasets, PEFT sources, the run protocol (uses the report's
    #                      mean ± std tables)
    "fma_fast": 7, "fma_fast.doctor": 7, "fma_fast.aot": 7,  # the facade (fma_fast/__init__),
    #   the doctor, the kernels' compile check over the real launch paths
    "fma_fast.cli": 8,  # argparse only
}
"""Package -> layer. A module may import its own package and the packages of lower layers;
packages of one layer are independent of each other except for :data:`SIBLING_IMPORTS`."""

SIBLING_IMPORTS = {("fma_fast.ops", "fma_fast.kernels")}
"""Same-layer imports allowed: the kernels are reached through ops (and from layer 2 up)."""


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


def unit(module: str) -> str | None:
    """The entry of :data:`LAYERS` a module belongs to (the longest package prefix; the bare
    ``fma_fast`` entry is the facade module alone)."""
    if module == "fma_fast":
        return module
    found = [key for key in LAYERS if key != "fma_fast"
             and (module == key or module.startswith(key + "."))]
    return max(found, key=len) if found else None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up a layer or across to a sibling package not allowed."""
    found = []
    for module, imported in sorted(graph.items()):
        here = unit(module)
        for target in sorted(imported):
            there = unit(target)
            if there == here or LAYERS[there] < LAYERS[here] or (here, there) in SIBLING_IMPORTS:
                continue
            found.append(f"{module} (layer {LAYERS[here]}) imports {target} "
                         f"(layer {LAYERS[there]})")
    return found


def test_every_module_has_a_layer():
    graph = import_graph()
    assert len(graph) > 50, f"only {len(graph)} modules found: the walk is broken"
    assert not [m for m in graph if unit(m) is None], "modules outside the layer table"


def test_imports_follow_the_layers():
    violations = layer_violations(import_graph())
    assert not violations, "imports against the layer table:\n" + "\n".join(violations)


def test_the_layer_check_finds_planted_violations():
    graph = import_graph()
    graph["fma_fast.core.policy"] = {*graph["fma_fast.core.policy"], "fma_fast.solver.api"}
    graph["fma_fast.io.files"] = {*graph["fma_fast.io.files"], "fma_fast.ops.scoring"}
    graph["fma_fast.io.features"] = {*graph["fma_fast.io.features"], "fma_fast.kernels._common"}
    found = layer_violations(graph)
    assert found == [
        "fma_fast.core.policy (layer 0) imports fma_fast.solver.api (layer 2)",
        "fma_fast.io.features (layer 1) imports fma_fast.kernels._common (layer 1)",
        "fma_fast.io.files (layer 1) imports fma_fast.ops.scoring (layer 1)",
    ], found


def test_a_function_local_import_counts():
    """Lazy imports are edges too: the CLI's lazy ``from ..clip import launch`` is one."""
    assert "fma_fast.clip" in import_graph()["fma_fast.cli.score"]


def test_choices_are_checked_by_the_one_helper():
    """Every "must be one of" message comes from ``core.names.check_choice``: no module checks
    a name against its own copy of a vocabulary by hand."""
    by_hand = [f"{path.relative_to(REPO)}:{number}"
               for path in _modules().values() if path.name != "names.py"
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if "must be one of" in line]
    assert not by_hand, f"choices checked by hand: {by_hand}"


MACHINE_PROBES = ("/proc/cpuinfo", "platform.processor", "metadata.version",
                  "get_device_properties", "_is_avx512", "_is_amx", "cpu_capability()",
                  "ISA_MASKS = ")
"""What describes the machine: read in ``core/environment.py`` only (the report, the doctor,
the bf16 rule and the benchmarks call it)."""


def test_the_machine_is_described_in_one_module():
    files = [*_modules().values(), *(REPO / "benchmarks").rglob("*.py")]
    elsewhere = sorted({f"{path.relative_to(REPO)}: {probe}"
                        for path in files if path.name != "environment.py"
                        for probe in MACHINE_PROBES if probe in path.read_text()})
    assert not elsewhere, "machine probes outside core/environment.py:\n" + "\n".join(elsewhere)


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
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_planted_cycle():
    graph = import_graph()
    plan, api = "fma_fast.solver.plan", "fma_fast.solver.api"
    graph[plan] = {*graph[plan], api}  # api -> ... -> plan
    assert _cycle(graph), "a planted cycle api -> plan -> api went unnoticed"


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
    """fma_fast.solve -> solver.api -> solver.routing -> solver.fused -> kernels.folded_step."""
    graph = import_graph()
    assert "fma_fast.solver.api" in graph["fma_fast"]
    for kernel in ("fma_fast.kernels.folded_step", "fma_fast.kernels.cosine_topk"):
        # from solve's module: the facade reaches the scoring kernels through ops.losses too
        path = _shortest(graph, "fma_fast.solver.api", kernel)
        if not path:  # dispatch imports the scoring kernels lazily, by name
            path = _shortest(graph, "fma_fast.solver.api", "fma_fast.ops.dispatch")
            path.append(kernel)
        path = ["fma_fast", *path]
        assert 1 < len(path) <= 5, " -> ".join(path)


def test_every_package_is_installed():
    """pyproject.toml lists every package folder: a subpackage missing there imports from a
    checkout but is absent from the installed wheel."""
    block = re.search(r"^packages = \[(.*?)\]", (REPO / "pyproject.toml").read_text(),
                      re.MULTILINE | re.DOTALL)
    listed = set(re.findall(r'"([\w.]+)"', block.group(1)))
    folders = {module for module, path in _modules().items() if path.name == "__init__.py"}
    assert folders == listed, (f"not installed: {sorted(folders - listed)}; "
                               f"listed but absent: {sorted(listed - folders)}")


PUBLIC = [
    "CheckpointError", "FitResult", "NotUnitNormWarning", "PerRowClasses", "ScoreSummary",
    "SolveResult", "StepSelection", "VelocityNet", "accuracy_by_steps", "cosine_cross_entropy",
    "fit", "load", "load_config", "load_official", "reference", "refine", "save", "score",
    "select_steps", "solve", "synthetic",
]
"""``fma_fast.__all__``: a public name is added (or removed) here on purpose, never by a move."""

CLIP_PUBLIC = [
    "DATASET_NAMES", "DATASET_TEMPLATES", "ENSEMBLES", "ClassifierError", "ClipEncoder",
    "CollapseWarning", "Context", "Dataset", "ExtractedFeatures", "FewShotClassifier", "Item",
    "MissingExtraError", "PEFT_METHODS", "PeftEncoder", "PeftError", "PeftSource",
    "PredictSummary", "Predictions", "Preprocess", "SplitFeatures", "accuracy_by_steps_sharded",
    "build_prompts", "cached_class_features", "extract", "extract_split", "few_shot", "launch",
    "load_dataset", "load_encoder", "load_peft", "load_split", "predict_images",
    "register_model_config", "resolve_pretrained", "resolve_templates", "solve_sharded",
]


def test_the_public_surface():
    import fma_fast.clip

    assert sorted(fma_fast.__all__) == sorted(PUBLIC)
    assert sorted(fma_fast.clip.__all__) == sorted(CLIP_PUBLIC)
    for package, names in ((fma_fast, PUBLIC), (fma_fast.clip, CLIP_PUBLIC)):
        missing = [name for name in names if not hasattr(package, name)]
        assert not missing, f"{package.__name__} lacks {missing}"
    assert callable(fma_fast.solve) and callable(fma_fast.score)  # not the subpackages
    assert callable(fma_fast.reference.euler_solve)
    assert callable(fma_fast.synthetic.make_task)


def test_every_public_name_is_documented():
    """docs/api.md lists every name of fma_fast.__all__, and no user doc (README.md, docs/)
    calls a fma_fast function outside it."""
    api = (REPO / "docs" / "api.md").read_text()
    missing = [name for name in fma_fast.__all__ if not re.search(rf"`[^`]*\b{name}\b", api)]
    assert not missing, f"in fma_fast.__all__ but not in docs/api.md: {missing}"
    for page in (REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))):
        called = set(re.findall(r"\bfma_fast\.([a-z_A-Z]+)\(", page.read_text()))
        undocumented = sorted(called - set(fma_fast.__all__) - {"kernels"})
        assert not undocumented, f"{page.name} calls fma_fast.{undocumented} outside __all__"


def test_test_modules_share_helpers_through_support_modules_only():
    """Helpers live in tests/support.py (and kernel_support.py, clip_support.py): a test module
    that imports another test module, or conftest, runs that module's import-time code and
    ties the two files together."""
    offenders = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno} imports {name}" for name in names
                          if name.split(".")[0] == "conftest" or name.startswith("test_")]
    assert not offenders, "\n".join(offenders)


def test_every_marked_prefix_names_a_test():
    """tests/conftest.py's MARKED table assigns the kinds by node id prefix: a renamed test
    would silently lose its mark (and a slow one would land in the fast subset)."""
    conftest = ast.parse((REPO / "tests" / "conftest.py").read_text())
    (table,) = [node.value for node in conftest.body if isinstance(node, ast.AnnAssign)
                and getattr(node.target, "id", "") == "MARKED"]
    marked = ast.literal_eval(table)
    assert {"slow", "subprocess", "compile", "cuda"} <= set(marked)
    stale = []
    for mark, prefixes in marked.items():
        for prefix in prefixes:
            module, _, test = prefix.partition("::")
            path = REPO / "tests" / module
            names = [node.name for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
                     ] if path.is_file() else []
            if not names or not any(name.startswith(test.split("[")[0]) for name in names):
                stale.append(f"{mark}: {prefix}")
    assert not stale, "MARKED entries that name no test:\n" + "\n".join(stale)


def test_json_files_are_parsed_by_the_one_reader():
    """Every JSON document fma_fast reads goes through ``io.files`` (read_json / loads_json:
    special files refused before opening, size and depth limits); json.load / json.loads
    appear nowhere else, but for round trips of its own values (json.loads(json.dumps(...)))."""

    def own_round_trip(call: ast.Call) -> bool:
        argument = call.args[0] if call.args else None
        return isinstance(argument, ast.Call) and ast.unparse(argument.func) == "json.dumps"

    found = [f"{path.relative_to(REPO)}:{node.lineno}"
             for path in _modules().values() if path.name != "files.py"
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and ast.unparse(node.func) in ("json.load",
                                                                          "json.loads")
             and not own_round_trip(node)]
    assert not found, f"JSON parsed outside io.files: {found}"
