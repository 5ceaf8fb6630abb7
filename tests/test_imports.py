"""The trainer's import contract: student_trainer imports teacher_client, its own modules,
third-party libraries, and of the service only its one public entry point for the
in-process teacher, teacher_service.in_process.

Checked twice: in the source (every import statement, wherever it sits, so a lazy import
inside a function counts too), and in a fresh interpreter (what importing the trainer
actually loads, which also covers what the entry point itself imports).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINT = "teacher_service.in_process"


def service_imports(source: str) -> list[str]:
    """The teacher_service modules a file's import statements name, in order."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from teacher_service import backend` names the module teacher_service.backend
            package = node.module == "teacher_service"
            names = [f"{node.module}.{a.name}" for a in node.names] if package else [node.module]
        else:
            continue
        found += [name for name in names if name.split(".")[0] == "teacher_service"]
    return found


def test_the_parser_sees_every_form_of_import():
    source = (
        "import teacher_service.backend\n"
        "from teacher_service import sampling\n"
        "from teacher_service.in_process import sample\n"
        "import teacher_client, numpy\n"
        "from . import sibling\n"
        "def later():\n"
        "    from teacher_service.codec import torch_dtype\n"
    )
    assert sorted(service_imports(source)) == [
        "teacher_service.backend",
        "teacher_service.codec",
        "teacher_service.in_process",
        "teacher_service.sampling",
    ]


def test_no_trainer_module_imports_the_service_except_through_its_entry_point():
    files = sorted((ROOT / "student_trainer").rglob("*.py"))
    assert ROOT / "student_trainer" / "train.py" in files
    offending = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in service_imports(path.read_text())
        if name != ENTRY_POINT
    ]
    assert offending == []


def _loaded_service_modules(*modules: str) -> set[str]:
    """The teacher_service modules in sys.modules after importing `modules` afresh."""
    script = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('teacher_service'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_importing_the_trainer_loads_only_the_entry_point_and_what_it_imports():
    entry_point = _loaded_service_modules(ENTRY_POINT)
    trainer = _loaded_service_modules(
        "student_trainer.train", "student_trainer.cli", "distill_lab.demo"
    )
    assert ENTRY_POINT in trainer
    assert trainer <= entry_point, trainer - entry_point
    # the entry point needs the model side only: no server, front ends or command line
    assert not {"teacher_service.server", "teacher_service.cli"} & entry_point
