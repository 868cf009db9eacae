"""The package's imports run one way: down the layers of docs/architecture.md, with no cycle.

Read from the source (every import statement, those inside functions too), so a lazy import
that would close a cycle or reach upward fails here as well."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scoremerge"

# docs/architecture.md's layers, bottom first: a module imports from its own layer or below.
# A module is placed by its longest listed prefix.
LAYERS = [
    ("foundation", ["_version", "_C", "_cpu", "errors", "validate", "parallel", "distributed"]),
    ("backend and files", ["backend", "io"]),
    ("ops", ["ops"]),
    ("references", ["ref"]),
    ("methods", ["methods"]),
    ("api", ["api"]),
    ("pipelines", ["streaming", "folders", "lora", "online", "config", "mergekit_yaml"]),
    ("applications", ["integrations", "demo", "doctor", "example"]),
    ("entry points", ["cli", "__main__", ""]),
]


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path):
    """The scoremerge modules `path` imports, by full name (`from x import y` counts x.y when y
    is a module, else x)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "scoremerge"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "scoremerge":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES or sub in EXTENSIONS else target)
    found.discard(name)
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
EXTENSIONS = {"scoremerge._C", "scoremerge._cpu"}   # built by setup.py, no source here
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def layer(module):
    """(index, name) of the layer holding `module` (a full name)."""
    inner = module.removeprefix("scoremerge").removeprefix(".")
    best = None
    for index, (layer_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if inner == prefix or inner.startswith(prefix + ".") or (prefix == "" and not inner):
                if best is None or len(prefix) > best[2]:
                    best = (index, layer_name, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: place it")
    return best[:2]


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_upward(module):
    mine, my_layer = layer(module)
    upward = {other: layer(other)[1] for other in GRAPH[module] if layer(other)[0] > mine}
    assert not upward, f"{module} ({my_layer}) imports from layers above it: {upward}"


def test_no_import_cycle():
    seen, on_path, cycles = set(), [], []

    def visit(module):
        if module in on_path:
            cycles.append(on_path[on_path.index(module):] + [module])
            return
        if module in seen:
            return
        seen.add(module)
        on_path.append(module)
        for other in sorted(GRAPH.get(module, ())):
            visit(other)
        on_path.pop()

    for module in sorted(GRAPH):
        visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(monkeypatch):
    """The checks above on a made-up graph: they must fail where they should."""
    monkeypatch.setitem(GRAPH, "scoremerge.errors", {"scoremerge.cli"})
    with pytest.raises(AssertionError, match="imports from layers above"):
        test_no_module_imports_upward("scoremerge.errors")
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle()
