"""The import graph of ``mxspool``: no cycles, and every import points down the layers.

Every module's imports are read with :mod:`ast` (module level and inside functions alike, since a
function-level import is still a dependency, only a lazy one), resolved to the module they name
(``from mxspool.store import codec`` is the module ``mxspool.store.codec``; ``from mxspool.store
import create_store`` is the package ``mxspool.store``), and checked against ``LAYERS``.

The layers, top to bottom (a module belongs to the entry with the longest matching prefix):

==  ==================  ===================================================================
 0  command line        ``mxspool.cli``: the command group and core commands; starts the server
 1  front ends          ``mxspool.service`` (the server: intake, delivery and admin together),
                        ``mxspool.migrate.commands`` (the migration commands),
                        ``mxspool.admin`` (HTTP API and dashboard, a front end like the CLI)
 2  command plumbing    ``mxspool.cli_support``: config, store lifetime, exit codes, output
 3  migration actions   ``mxspool.migrate.actions``: the toolkit's operations, built on 4
 4  operations          ``mxspool.operations``: what every front end can do to the spool
 5  engines             ``mxspool.delivery``, ``mxspool.intake``, ``mxspool.migrate`` (its
                        checks, probes and runbook, which use delivery's routing and DNS)
 6  views               ``mxspool.metrics``, ``mxspool.stage``: derived from store records
 7  store and protocol  ``mxspool.store``, ``mxspool.smtp`` (the sans-IO SMTP core)
 8  leaves              ``mxspool.config``, ``mxspool.units``, ``mxspool.envelope``,
                        ``mxspool.body``, ``mxspool.ids``, ``mxspool.csvsafe``, ``mxspool``
==  ==================  ===================================================================

An import may go to a module of the same layer or of a lower one, never up; and the graph has
no cycle at all: not between modules (even within a layer), nor between packages (``mxspool.X``
taken as a whole: ``migrate.actions`` builds on ``operations``, so ``operations`` may import
nothing from ``migrate``). A new module falls in its package's layer; a new
top-level module must be added to the table, which is the point: decide where it sits.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("command line", ("mxspool.cli",)),
    (
        "front ends",
        (
            "mxspool.service",
            "mxspool.migrate.commands",
            "mxspool.migrate.migration_commands",
            "mxspool.migrate.plan_output",
            "mxspool.admin",
            "mxspool.tls.commands",
            "mxspool.notify.commands",
            "mxspool.notify.component",
            "mxspool.maintenance",
            "mxspool.doctor",
            "mxspool.evidence.commands",
            "mxspool.retention",
        ),
    ),
    ("command plumbing", ("mxspool.cli_support",)),
    ("migration actions", ("mxspool.migrate.actions", "mxspool.migrate.migration")),
    ("operations", ("mxspool.operations", "mxspool.evidence")),
    (
        "engines",
        ("mxspool.delivery", "mxspool.intake", "mxspool.migrate", "mxspool.tls", "mxspool.notify"),
    ),
    ("views", ("mxspool.metrics", "mxspool.stage")),
    ("store and protocol", ("mxspool.store", "mxspool.smtp")),
    (
        "leaves",
        (
            "mxspool.config",
            "mxspool.units",
            "mxspool.envelope",
            "mxspool.body",
            "mxspool.ids",
            "mxspool.csvsafe",
            "mxspool.addresses",
            "mxspool.nameservers",
            "mxspool.liveness",
            "mxspool",
        ),
    ),
)


def layer_of(module: str) -> int:
    """The index in LAYERS of the entry with the longest prefix matching ``module``."""
    best, best_length = -1, -1
    for index, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best < 0:
        raise LookupError(module)
    return best


def find_modules(src: Path) -> dict[str, Path]:
    """Every module of the package under ``src``: ``.py`` files, and ``.pyi`` for compiled ones."""
    modules: dict[str, Path] = {}
    for path in sorted(src.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi") or "egg-info" in str(path):
            continue
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        modules.setdefault(name, path)
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(module imported, line) for every ``mxspool`` import in the file, at any depth."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mxspool":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "mxspool":
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield (submodule if submodule in modules else target), node.lineno


def import_graph(src: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}, for the package under ``src``."""
    modules = find_modules(src)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for target, line in imports_of(name, path, modules):
            if target != name:
                edges.setdefault(target, line)
    return graph


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    """Every import that points to a higher layer, as readable lines."""
    found = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            if layer_of(target) < layer_of(module):
                found.append(
                    f"{module} (layer {LAYERS[layer_of(module)][0]}), line {line}, imports "
                    f"{target} (layer {LAYERS[layer_of(target)][0]})"
                )
    return found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_graph(graph: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The graph between packages: each module taken as its ``mxspool.X`` package (or module)."""

    def unit(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages: dict[str, dict[str, int]] = {}
    for module, edges in graph.items():
        targets = packages.setdefault(unit(module), {})
        for target, line in edges.items():
            if unit(target) != unit(module):
                targets.setdefault(unit(target), line)
    return packages


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(SRC)


def test_the_graph_is_read(graph: dict[str, dict[str, int]]) -> None:
    # Positive control for the checks below: the parser sees module-level, function-level and
    # compiled-module imports, so an empty graph cannot pass them by accident.
    assert len(graph) > 50
    assert "mxspool.operations" in graph["mxspool.cli"]
    assert "mxspool.service" in graph["mxspool.cli"]  # imported inside `serve`
    assert "mxspool.store._groupcommit" in graph["mxspool.store.sqlite"]  # inside a try


def test_every_module_has_a_layer(graph: dict[str, dict[str, int]]) -> None:
    unplaced = []
    for module in sorted({*graph, *(target for edges in graph.values() for target in edges)}):
        try:
            layer_of(module)
        except LookupError:
            unplaced.append(module)
    assert not unplaced, f"modules missing from LAYERS (decide where they sit): {unplaced}"


def test_no_import_cycles(graph: dict[str, dict[str, int]]) -> None:
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_cycles_between_packages(graph: dict[str, dict[str, int]]) -> None:
    found = cycles(package_graph(graph))
    assert not found, "package cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_import_points_down(graph: dict[str, dict[str, int]]) -> None:
    found = upward_imports(graph)
    assert not found, "imports pointing up the layers:\n" + "\n".join(found)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    # Positive control: a store module importing the CLI breaks both rules at once.
    package = tmp_path / "mxspool"
    (package / "store").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "store" / "__init__.py").write_text("")
    (package / "store" / "base.py").write_text("def f():\n    from mxspool.cli import main\n")
    (package / "cli.py").write_text("from mxspool.store import base\n")
    fake = import_graph(tmp_path)
    assert fake["mxspool.store.base"] == {"mxspool.cli": 2}
    assert fake["mxspool.cli"] == {"mxspool.store.base": 1}
    assert upward_imports(fake) == [
        "mxspool.store.base (layer store and protocol), line 2, imports mxspool.cli "
        "(layer command line)"
    ]
    assert cycles(fake) == [["mxspool.cli", "mxspool.store.base"]]
    assert cycles(package_graph(fake)) == [["mxspool.cli", "mxspool.store"]]
