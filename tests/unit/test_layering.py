"""The import graph of the project's packages: acyclic, and pointing down the layers.

docs/spec.md, "Install and layout": pipelines (assembly, CLI) -> transforms (PTransforms
and DoFns) -> models (detectors, embedders) -> runners (presets, the Dask runner, the
error types); imports point down that list. Every import counts, also one inside a
function (an import made late to save start-up time is still a dependency)."""
import ast
from pathlib import Path

from conftest import REPO

LAYERS = ("pipelines", "transforms", "models", "runners")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    """{module name: its source path} of every module of the four packages."""
    return {_module_name(path): path for layer in LAYERS
            for path in sorted((REPO / layer).rglob("*.py"))}


def _imported(node: ast.AST, modules) -> list:
    """The project modules an Import / ImportFrom node names (``from pkg import mod``
    names the module ``pkg.mod`` when there is one, else ``pkg``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = ["%s.%s" % (node.module, alias.name) for alias in node.names]
        names = [n if n in modules else node.module for n in names]
    else:
        return []
    found = []
    for name in names:
        while name and name not in modules:  # import a.b.c: the deepest project module
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def import_graph():
    """{module: set of the project modules it imports}."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {target for node in ast.walk(tree)
                       for target in _imported(node, modules) if target != name}
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def upward_imports(graph):
    """``(module, imported)`` pairs whose import points up the layers."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return sorted((source, target) for source, targets in graph.items() for target in targets
                  if rank[target.split(".")[0]] < rank[source.split(".")[0]])


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "runners.errors" in graph["pipelines.cli"]           # from runners.errors import
    assert "pipelines.commands" in graph["pipelines.cli"]       # from pipelines import commands
    assert "pipelines.options" in graph["pipelines.command"]    # import pipelines.options
    assert "transforms.match_blocks" in graph["transforms.matching"]  # a package
    assert "models.pair_scorer" in graph["transforms.learned_matching"]  # inside a function


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert find_cycle({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}) == [
        "a.x", "a.y", "a.z", "a.x"]
    assert find_cycle({"a.x": {"a.y"}, "a.y": set()}) is None
    assert upward_imports({"runners.r": {"pipelines.p"}, "pipelines.p": {"runners.r"}}) == [
        ("runners.r", "pipelines.p")]


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_imports_point_down_the_layers():
    assert upward_imports(import_graph()) == []
