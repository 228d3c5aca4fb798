"""The package's structure: no import cycle among exporter's modules, function-local imports included,
and `import exporter` and the CLI stay cheap (no torch, onnx or tensorrt until a command needs them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "exporter"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: exporter modules it imports anywhere in its source (top level or inside functions)}."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                if target in modules and target != name and target != "exporter":
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_function_local_imports(tmp_path):
    # the walker reads imports inside functions too (the old layout hid its cycles there)
    graph = import_graph()
    assert "exporter.onnx.contract" in graph["exporter.pipeline.run"]
    assert graph["exporter.errors"] == set()


def test_import_exporter_is_cheap():
    code = ("import sys, exporter, exporter.mask, exporter.recipe, exporter.cost, exporter.cli, exporter.commands.inspect; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt', 'tensorrt_rtx', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def test_digests_have_one_home():
    # sha256 (file bytes, canonical JSON, code fingerprints) is computed in exporter/files.py only
    hashing = set()
    for name, tree in _sources():
        for node in ast.walk(tree):
            imported = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                        [node.module] if isinstance(node, ast.ImportFrom) else [])
            called = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "sha256"
            if "hashlib" in imported or called:
                hashing.add(name)
    assert hashing <= {"exporter/files.py"}, f"sha256 computed outside exporter/files.py: {sorted(hashing)}"


def test_cache_names_only_in_contract():
    # the ONNX cache names (past_key_values.{i}.key, present.{i}.value) are spelled in exporter/onnx/contract.py only
    import re

    spelled = re.compile(r"past_key_values\\?\.|\bpresent\\?\.(?=[\w{%*(])")  # in regexes too
    found = [f"{name}:{node.lineno}" for name, tree in _sources() if name != "exporter/onnx/contract.py"
             for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and spelled.search(node.value)]
    assert not found, f"cache names spelled outside exporter/onnx/contract.py: {found}"


# The layers, lowest first: a module imports only from its own layer or the ones below (tested below). Each entry
# is a top-level module or a sub-package (counted as one node). docs/design.md draws the same picture.
LAYERS = [
    {"errors", "dtypes", "versions", "machine", "measure", "progress", "files", "mask", "architectures", "cluster"},
    {"recipe", "cost"},  # typed recipes; the cost model (config arithmetic only)
    {"report", "onnx"},  # report.json's schema; the ONNX graph work and its contract, ORT sessions
    {"model", "backends"},  # the base model and its skipped form; one runner per runtime
    {"checks", "timing"},  # parity, the recorded reference, the manifest; timing primitives (no stage, no command)
    {"pipeline", "quality"},  # the main job's stages; the quality of a mask and the search for one
    {"commands"},  # one module per command: arguments, orchestration, printing
    {"cli"},
]


def node_of(module: str) -> str:
    """exporter.pipeline.run -> pipeline; exporter.cost -> cost."""
    return module.split(".")[1]


def node_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph with each sub-package (and each top-level module) as one node."""
    nodes: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module == "exporter":
            continue
        nodes.setdefault(node_of(module), set()).update(node_of(t) for t in targets if node_of(t) != node_of(module))
    return nodes


def layer_violations(nodes: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    rank = {name: i for i, layer in enumerate(layers) for name in layer}
    return [f"{a} (layer {rank[a]}) imports {b} (layer {rank[b]})"
            for a, targets in sorted(nodes.items()) for b in sorted(targets) if rank[b] > rank[a]]


def test_no_cycle_between_folders():
    """Sub-packages as nodes: no two import each other, directly or around a circle."""
    cycle = find_cycle(node_graph(import_graph()))
    assert cycle is None, "folders import each other: " + " -> ".join(cycle)


def test_every_node_has_a_layer():
    named = set().union(*LAYERS)
    assert set(node_graph(import_graph())) <= named, sorted(set(node_graph(import_graph())) - named)


def test_imports_point_down_the_layers():
    """No import from a lower layer into a higher one: timing imports no stage, libraries import no command."""
    violations = layer_violations(node_graph(import_graph()), LAYERS)
    assert not violations, violations


def test_layer_check_finds_a_planted_upward_import():
    nodes = {"timing": {"onnx", "pipeline"}, "pipeline": {"timing"}, "onnx": set()}
    layers = [{"onnx"}, {"timing"}, {"pipeline"}]
    assert layer_violations(nodes, layers) == ["timing (layer 1) imports pipeline (layer 2)"]
    assert find_cycle(nodes) == ["pipeline", "timing", "pipeline"]
