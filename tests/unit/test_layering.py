"""The package's imports run one way: no cycles, and no module imports a layer above its own.

Run alone: ``pytest tests/unit/test_layering.py``. Every ``import`` and ``from ... import`` in
``pipeline/`` counts, at module level or inside a function, except those under
``if TYPE_CHECKING:`` (annotations only, never executed).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"

# Lower layers first. A module may import modules of its own layer or of layers below it.
# A module matches the longest prefix listed; every module of the package must match one.
LAYERS: list[tuple[str, ...]] = [
    # pure: formats, rules and definitions, free of I/O
    (
        "pipeline",
        "pipeline.state.codec",
        "pipeline.failpoints",
        "pipeline.rules.rates",
        "pipeline.ingest.identity",
    ),
    ("pipeline.events", "pipeline.rules", "pipeline.ingest.providers"),
    ("pipeline.kafka.topics", "pipeline.credentials"),
    ("pipeline.settings",),
    ("pipeline.diagnosis", "pipeline.http.security", "pipeline.kafka"),
    ("pipeline.kafka.compat", "pipeline.kafka.security", "pipeline.metrics"),
    ("pipeline.state",),
    # I/O: ingest, the stages, the HTTP side
    ("pipeline.ingest.producer",),
    ("pipeline.ingest.service",),
    ("pipeline.stages",),
    ("pipeline.http",),
    ("pipeline.worker", "pipeline.ingest.server", "pipeline.ingest.processes"),
    # tools and the command line
    ("pipeline.simulation", "pipeline.diagnosis.report", "pipeline.bench"),
    ("pipeline.cli", "pipeline.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: str | None = None) -> set[str]:
    """The ``pipeline`` modules (and names in them) that ``path`` imports; ``package`` is the
    one relative imports start from (the module's own)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):  # imports only for type checkers never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    found: set[str] = set()
    if package is None:
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "pipeline" or name.startswith("pipeline.")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        edges[name] = {target for target in imports_of(path) if target in modules and target != name}
    return edges


def layer_of(module: str) -> int:
    best, found = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} belongs to no layer: add it to LAYERS"
    return found


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_upward_imports():
    edges = graph()
    upward = [
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
        for source, targets in sorted(edges.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(source)
    ]
    assert not upward, "imports that run up:\n" + "\n".join(upward)


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pipeline.http.server import WebApp\n"
        "def f():\n    from pipeline.settings import Settings\n"
        "import pipeline.state.codec\n"
        "from .producer import EventProducer\n"
    )
    assert imports_of(module, "pipeline.ingest") == {
        "pipeline.settings",
        "pipeline.settings.Settings",
        "pipeline.state.codec",
        "pipeline.ingest.producer",
        "pipeline.ingest.producer.EventProducer",
    }
