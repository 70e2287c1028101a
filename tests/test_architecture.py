"""The module graph of normlab: no import cycle and no upward import between layers.

Layers, lowest first (a module may import its own layer and the ones below it, never above)::

    _checks  ←  core  ←  functional  ←  nn (and the package root)  ←  lab  ←  bench  ←  cli

The imports are read from the source with ``ast`` (every import statement, including the ones
inside functions and ``TYPE_CHECKING`` blocks: a lazy import is still a dependency), so the test
runs nothing of normlab and fails on the edge that breaks the rule, by name.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / "normlab"

#: Top-level part of a module name -> its layer (lower is more basic).
LAYERS: dict[str, int] = {
    "_checks": 0,
    "core": 1,
    "functional": 2,
    "nn": 3,
    "": 3,  # the package root re-exports functional and nn (and nothing above them)
    "lab": 4,
    "bench": 5,
    "cli": 6,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The normlab modules ``name`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for target in targets:
            # `import normlab.nn.utils` depends on the deepest part that is a normlab module.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


@functools.cache
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    assert top in LAYERS, f"{module}: not in a layer of LAYERS; add its top-level name there"
    return LAYERS[top]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read() -> None:
    graph = _graph()
    # A few edges that exist, so that an empty graph (a parsing mistake) cannot pass the rules.
    assert "normlab.core.ops" in graph["normlab.functional"]
    assert "normlab.functional" in graph["normlab.nn.batchnorm"]
    assert "normlab.lab.models.registry" in graph["normlab.lab.models.recurrent"]
    assert "normlab.nn.utils.convert" in graph["normlab.nn.syncbatchnorm"]  # a function-local import


def test_no_import_cycle() -> None:
    cycles = _cycles(_graph())
    assert cycles == [], f"import cycles among normlab modules: {cycles}"


def test_no_upward_import() -> None:
    upward = sorted(
        f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})"
        for src, targets in _graph().items()
        for dst in targets
        if _layer(dst) > _layer(src)
    )
    assert upward == [], "imports from a higher layer:\n" + "\n".join(upward)


@pytest.mark.parametrize(
    "module, forbidden",
    [
        # The registry is imported by the model modules, never the reverse.
        ("normlab.lab.models.registry", "normlab.lab.models."),
        # The runner registry knows no study: studies register themselves when imported.
        ("normlab.lab.runners", "normlab.lab.studies"),
    ],
)
def test_registries_do_not_import_their_entries(module: str, forbidden: str) -> None:
    bad = sorted(m for m in _graph()[module] if m.startswith(forbidden) and m != module)
    assert bad == [], f"{module} imports {bad}"
