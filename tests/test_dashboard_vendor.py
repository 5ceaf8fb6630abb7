"""The vendored uPlot is the npm package's files, as scripts/vendor_uplot.py recorded them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from setuptools.config.pyprojecttoml import read_configuration

from teacher_service.frontends.http.dashboard import ASSETS, STATIC

ROOT = Path(__file__).resolve().parent.parent
UPLOT = STATIC / "uplot"


def test_committed_files_match_the_recorded_sha256():
    record = json.loads((UPLOT / "VENDOR.json").read_text())
    assert record["package"] == "uplot"
    assert set(record["files"]) == {"uPlot.iife.min.js", "uPlot.min.css", "LICENSE"}
    for name, digest in record["files"].items():
        assert hashlib.sha256((UPLOT / name).read_bytes()).hexdigest() == digest, name


def test_the_script_names_its_version_and_the_license_is_mit():
    record = json.loads((UPLOT / "VENDOR.json").read_text())
    banner = (UPLOT / "uPlot.iife.min.js").read_text().splitlines()[0]
    assert f"(v{record['version']})" in banner
    assert (UPLOT / "LICENSE").read_text().startswith("The MIT License (MIT)")


def test_every_served_file_ships_in_the_package():
    """pyproject's package-data must cover what /dashboard serves, or a wheel's page is bare."""
    setuptools = read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]
    globs = setuptools["package-data"]["teacher_service"]
    package = ROOT / "teacher_service"
    shipped = {path for pattern in globs for path in package.glob(pattern)}
    served = {STATIC / "dashboard.html", *(STATIC / relative for relative, _ in ASSETS.values())}
    assert served <= shipped
