"""docs/design.md's module map and the package docstrings, held against the tree, as
tests/test_error_table.py holds the errors table against the code: a module added, moved
or removed without its line in the map (or in its package's docstring) fails here.

The map is the fenced block under "## Module map and request path": a line at column 0
names a package's folder, a line indented by two spaces starts with one path (or several,
comma-separated) relative to it and then, after two or more spaces, what it does; deeper
indented lines continue a description.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("teacher-client/teacher_client", "causal_lm", "teacher_service", "student_trainer")
PACKAGES += ("distill_lab",)
GENERATED = "proto"  # the client's generated protobuf modules: the folder is named, not its files


def map_block(text: str) -> list[str]:
    section = text[text.index("## Module map and request path") :]
    return section.split("```\n", 2)[1].splitlines()


def documented_paths(lines: list[str]) -> set[str]:
    """Every path the map names, relative to the repository root."""
    paths, folder = set(), None
    for line in lines:
        if not line.strip():
            continue
        if not line.startswith(" "):
            folder = line.split()[0]
            paths.add(folder.rstrip("/"))
        elif not line.startswith("   "):
            assert folder is not None, f"an entry before any package folder: {line!r}"
            head = re.split(r"\s{2,}", line.strip())[0]
            paths.update(f"{folder}{name.strip()}".rstrip("/") for name in head.split(","))
    return paths


def tree_paths() -> set[str]:
    """Every module (but __init__.py) and every sub-package of the packages."""
    paths = set()
    for package in PACKAGES:
        folder = ROOT / package
        paths.add(package)
        for path in folder.rglob("*"):
            relative = path.relative_to(ROOT)
            if "__pycache__" in relative.parts:
                continue
            if (path.is_dir() and (path / "__init__.py").exists()) or (
                path.suffix == ".py"
                and path.name != "__init__.py"
                and GENERATED not in path.relative_to(folder).parts
            ):
                paths.add(relative.as_posix())
    return paths


def test_the_map_parser_reads_folders_single_entries_and_lists():
    lines = [
        "pkg/       a package",
        "  a.py     one module",
        "           its description goes on",
        "  b.py, c.py   two, one line",
        "  sub/     a sub-package",
        "  sub/d.py     a module in it",
    ]
    assert documented_paths(lines) == {
        "pkg",
        "pkg/a.py",
        "pkg/b.py",
        "pkg/c.py",
        "pkg/sub",
        "pkg/sub/d.py",
    }


def test_the_design_docs_module_map_names_every_module_and_only_modules_that_exist():
    documented = documented_paths(map_block((ROOT / "docs/design.md").read_text()))
    tree = tree_paths()
    assert "teacher_service/frontends/http/app.py" in tree
    assert sorted(tree - documented) == [], "modules missing from docs/design.md's map"
    assert sorted(documented - tree) == [], "docs/design.md's map names modules that do not exist"


def package_folders() -> list[Path]:
    return sorted(
        path.parent
        for package in PACKAGES
        for path in (ROOT / package).rglob("__init__.py")
        if GENERATED not in path.relative_to(ROOT / package).parts
    )


@pytest.mark.parametrize("folder", package_folders(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_each_package_docstring_lists_its_modules(folder: Path):
    docstring = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
    members = [
        f"{path.name}/" if path.is_dir() else path.name
        for path in sorted(folder.iterdir())
        if (path.suffix == ".py" and path.name not in ("__init__.py", "__main__.py"))
        or (path.is_dir() and (path / "__init__.py").exists())
    ]
    missing = [
        name for name in members if not re.search(rf"(?<![\w/]){re.escape(name)}", docstring)
    ]
    assert missing == [], f"{folder.relative_to(ROOT)}/__init__.py's docstring leaves out"
