"""The packages of `starrec` form layers that point one way.

A package may import only from packages in lower layers: the shared records and
protocols (`starrec.core`) at the bottom, then the data, the CST, the LLM backends,
the agents and the student, training, evaluation, the library API (`starrec.experiment`), and the HTTP API and CLI
on top. An
import that points up (or sideways, between the peers of one layer) is how the cycles
this test guards against begin, so every import counts: one inside a function (a lazy
import) or under `TYPE_CHECKING` ties the packages together as much as one at the top
of a module. The check reads the source (AST), so it needs nothing installed.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "starrec"

# Bottom to top. A package imports only packages of layers below its own; the packages
# of one layer are peers that do not import each other. A new package gets a place here.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("paths", "progress", "labels", "resources"),  # leaf utilities and the data files
    ("core",),  # Task, Recommendation, System, Recommender, tool calls, resource loading
    ("data",),
    ("config",),  # validates data column mappings (starrec.data.generic)
    ("latent",),  # SASRec, ALS: models the CST stores as signals and the baselines evaluate
    ("cst",),
    ("baselines", "llm"),
    ("trajectories",),  # teacher runs and the student's language
    ("agents", "inference"),  # the teacher; the student
    ("training",),
    ("evaluation",),
    ("experiment",),  # the library API: task sets, stores, systems by name, evaluation
    ("pipeline",),  # the main job, stage by stage, over the library API
    ("api",),
    ("cli",),
)
LAYER = {package: level for level, group in enumerate(LAYERS) for package in group}

Edges = dict[tuple[str, str], list[str]]


def package_of(path: Path) -> str | None:
    """The top-level package (or module) of `starrec` a file belongs to; None for the
    package root `starrec/__init__.py`."""
    parts = path.relative_to(SOURCE).parts
    if len(parts) == 1:
        return None if parts[0] == "__init__.py" else Path(parts[0]).stem
    return parts[0]


def packages() -> set[str]:
    """Every top-level package and module under src/starrec."""
    return {package for path in SOURCE.rglob("*.py") if (package := package_of(path))}


def imported_modules(node: ast.AST, path: Path) -> list[str]:
    """Absolute module names an import statement names (relative ones resolved);
    `from starrec import x` names `starrec.x`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        here = ["starrec", *path.relative_to(SOURCE).parent.parts]
        base = ".".join(here[:len(here) - node.level + 1])
        module = f"{base}.{node.module}" if node.module else base
    else:
        module = node.module or ""
    if module == "starrec":
        return [f"starrec.{alias.name}" for alias in node.names]
    return [module]


def package_edges() -> Edges:
    """(importer, imported) package pairs, each with the `file:line` of its imports."""
    edges: Edges = defaultdict(list)
    known = packages()
    for path in sorted(SOURCE.rglob("*.py")):
        source = package_of(path)
        if source is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for module in imported_modules(node, path):
                parts = module.split(".")
                if parts[0] != "starrec" or len(parts) < 2 or parts[1] not in known:
                    continue
                if parts[1] != source:
                    where = f"{path.relative_to(SOURCE.parent)}:{node.lineno} imports {module}"
                    edges[(source, parts[1])].append(where)
    return edges


def cyclic_groups(edges: Edges) -> list[list[str]]:
    """The packages that reach each other through imports (the strongly connected
    components of more than one package), each sorted; empty when the graph is acyclic."""
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target in edges:
        graph[source].add(target)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in graph[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        return seen

    reachable = {node: reach(node) for node in list(graph)}
    groups = {frozenset({a, *(b for b in reachable[a] if a in reachable.get(b, ()))})
              for a in reachable if a in reachable[a]}
    return sorted(sorted(group) for group in groups)


def describe(edges: Edges, pairs: list[tuple[str, str]]) -> str:
    return "\n".join(f"  {a} -> {b}: " + "; ".join(edges[(a, b)]) for a, b in pairs)


def test_every_package_has_a_layer() -> None:
    assert packages() - set(LAYER) == set(), "place the new package in LAYERS"
    assert set(LAYER) - packages() == set(), "LAYERS names a package that does not exist"


def test_no_import_cycle_between_packages() -> None:
    edges = package_edges()
    groups = cyclic_groups(edges)
    if groups:
        inside = sorted((a, b) for a, b in edges if any({a, b} <= set(g) for g in groups))
        pytest.fail(f"packages that import each other in a circle, {groups}:\n"
                    + describe(edges, inside))


def test_imports_point_down_the_layers() -> None:
    edges = package_edges()
    upward = sorted((a, b) for a, b in edges
                    if a in LAYER and b in LAYER and LAYER[b] >= LAYER[a])
    if upward:
        pytest.fail("imports that point up (or sideways) the layers of tests/test_layers.py:\n"
                    + describe(edges, upward))


def test_the_check_sees_lazy_and_relative_imports() -> None:
    """An import inside a function counts, and a relative one is resolved."""
    module = SOURCE / "cst" / "example.py"  # not written: only its path is used
    tree = ast.parse("def f():\n    from starrec.cli import main\n    from ..data import tasks\n")
    found = [m for node in ast.walk(tree) for m in imported_modules(node, module)]
    assert found == ["starrec.cli", "starrec.data"]
