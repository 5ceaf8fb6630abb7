"""No import cycles: in the client, the service, the trainer, the shared model kernels and
distill_lab, no module imports one that (transitively) imports it back, not even from
inside a function; and the packages import each other in one direction only.

The graph is read from the source with `ast` (every import statement, wherever it sits),
so a lazy import that hides a cycle from the interpreter does not hide it from this test.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "teacher_client": ROOT / "teacher-client" / "teacher_client",
    "teacher_service": ROOT / "teacher_service",
    "student_trainer": ROOT / "student_trainer",
    "causal_lm": ROOT / "causal_lm",
    "distill_lab": ROOT / "distill_lab",
}
# package -> the packages it may import (the layering of docs/design.md, "Module map")
MAY_IMPORT = {
    "teacher_client": set(),
    "causal_lm": set(),
    "teacher_service": {"teacher_client", "causal_lm"},
    "student_trainer": {"teacher_client", "causal_lm", "teacher_service", "distill_lab"},
    "distill_lab": {"teacher_client", "causal_lm", "teacher_service", "student_trainer"},
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports (`from a import b` is module a.b when a.b is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & known


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    known = set(modules)
    return {name: imported_modules(path, known) - {name} for name, path in modules.items()}


def test_the_graph_sees_every_package_and_their_imports():
    graph = import_graph()
    for package in PACKAGES:
        assert package in graph
    assert "teacher_client.codec" in graph["teacher_service.codec"]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_module_imports_itself_back(package):
    graph = {m: deps for m, deps in import_graph().items() if m.split(".")[0] == package}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_the_packages_import_each_other_in_one_direction_only():
    """client and causal_lm import no other package; the service imports those two; the
    trainer reaches the service only through its in-process entry point and
    distill_lab only from its command line (which fronts two of their tools); nothing but
    distill_lab imports the trainer."""
    graph = import_graph()
    crossing = {
        (source, target)
        for source, targets in graph.items()
        for target in targets
        if source.split(".")[0] != target.split(".")[0]
    }
    assert {(a.split(".")[0], b.split(".")[0]) for a, b in crossing if a.startswith("distill_lab")}
    refused = [
        f"{source} -> {target}"
        for source, target in sorted(crossing)
        if target.split(".")[0] not in MAY_IMPORT[source.split(".")[0]]
    ]
    assert refused == []
    trainer_to_service = {t for s, t in crossing if s.startswith("student_trainer.")}
    assert {t for t in trainer_to_service if t.startswith("teacher_service")} == {
        "teacher_service.in_process"
    }
    assert {s for s, t in crossing if t.startswith("distill_lab")} == {"student_trainer.cli"}
