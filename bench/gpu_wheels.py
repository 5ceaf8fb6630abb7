"""bench/gpu-wheels.txt: the packages bench/gpu.sh carries to the GPU machine as wheels.

    .venv/bin/python bench/gpu_wheels.py               # derive the list and print it
    .venv/bin/python bench/gpu_wheels.py --write       # ... and rewrite bench/gpu-wheels.txt
    python3 bench/gpu_wheels.py verify WHEELS          # every pin has a CPython 3.12 wheel
    python bench/gpu_wheels.py unpack WHEELS SITE      # unpack the pins' wheels for this Python

(verify and unpack are bench/gpu.sh's: stdlib only, no pip, no network.)

The GPU machine has no network and its image's packages (bench/gpu-image-packages.txt, a copy
of ../shared/gpu-image-packages.txt) lack some of ours or have them too old. The list is
the requirement closure of the two distributions, teacher-service and teacher-client (as
the tree's pyproject.toml files declare them; every other distribution as this environment
has it installed; markers read for CPython 3.12 on Linux x86-64, no extras), walked from
the roots: a requirement the image's version
satisfies is the image's to meet (its own dependencies are in the image); any other is
carried, pinned to this environment's version, and its own requirements are walked in
turn. torch is never carried (the image's CUDA build is the point); if the image's torch
were too old, that is an error, not a wheel. tests/test_gpu_script.py checks the result
against every import of the code the script runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import shutil
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGE_LIST = HERE / "gpu-image-packages.txt"
WHEELS_LIST = HERE / "gpu-wheels.txt"
ROOTS = ("teacher-service", "teacher-client")
NEVER_CARRIED = {"torch"}  # and what only it needs: the image's CUDA stack
IMAGE_PYTHON = (3, 12)
# the GPU image's interpreter, for requirement markers (python_version, sys_platform, ...)
TARGET = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "platform_release": "",
    "platform_version": "",
    "extra": "",
}


def normalize(name: str) -> str:
    """PEP 503's name (packaging's canonicalize_name, which the image's unpacking lacks)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path = WHEELS_LIST) -> dict[str, str]:
    """gpu-wheels.txt: normalized distribution name -> pinned version."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[normalize(name)] = version.strip()
    return found


def fits(wheel: Path, minor: int) -> bool:
    """Whether a wheel installs on CPython 3.`minor`, Linux x86-64."""
    python, abi, platforms = wheel.stem.split("-")[-3:]
    tags = python.split(".")
    cpython = f"cp3{minor}" in tags or any(t in ("py3", f"py3{minor}") for t in tags)
    stable = abi == "abi3" and any(
        t.startswith("cp3") and t[3:].isdigit() and int(t[3:]) <= minor for t in tags
    )
    linux = any(
        p == "any" or re.fullmatch(r"(many|musl)linux.*_x86_64", p) for p in platforms.split(".")
    )
    return (cpython or stable) and linux


def pinned_wheels(wheels: Path, minor: int) -> tuple[list[Path], list[str]]:
    """The wheels in `wheels` of the pinned versions that fit CPython 3.`minor` (one per pin),
    and the pins none fits."""
    chosen, missing = [], []
    for name, version in pins().items():
        found = [
            wheel
            for wheel in sorted(wheels.glob("*.whl"))
            if normalize(wheel.name.split("-")[0]) == name
            and wheel.name.split("-")[1] == version
            and fits(wheel, minor)
        ]
        if found:
            chosen.append(found[0])
        else:
            missing.append(f"{name}=={version}")
    return chosen, missing


def unpack(wheels: Path, site: Path) -> list[str]:
    """Unpack the pinned wheels that fit this Python into `site` (a PYTHONPATH folder: a
    wheel's .data/purelib and .data/platlib go to the top); returns the pins missing."""
    chosen, missing = pinned_wheels(wheels, sys.version_info.minor)
    site.mkdir(parents=True, exist_ok=True)
    for wheel in chosen:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
        for data in site.glob("*.data"):
            for lib in ("purelib", "platlib"):
                if (data / lib).is_dir():
                    shutil.copytree(data / lib, site, dirs_exist_ok=True)
            shutil.rmtree(data)
        print(f"  unpacked {wheel.name}")
    return missing


def image_packages(path: Path = IMAGE_LIST) -> dict[str, str]:
    """`pip list`'s table (after its # comments): normalized name -> version."""
    found = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith(("#", "Package", "---")):
            found[normalize(parts[0])] = parts[1]
    return found


PYPROJECTS = {"teacher-service": HERE.parent, "teacher-client": HERE.parent / "teacher-client"}


def declared(name: str) -> list[str]:
    """A distribution's requirements: ours as the tree's pyproject.toml declares them (an
    editable install's metadata lags behind an edit), any other as installed."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the installed metadata
        tomllib = None
    if name in PYPROJECTS and tomllib is not None:
        text = (PYPROJECTS[name] / "pyproject.toml").read_text()
        return tomllib.loads(text)["project"]["dependencies"]
    return metadata.distribution(name).requires or []


def requirements(name: str) -> list:
    """A distribution's requirements that apply on the GPU image (no extras)."""
    from packaging.requirements import Requirement

    found = []
    for text in declared(name):
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate(TARGET):
            found.append(requirement)
    return found


def carried(image: dict[str, str]) -> dict[str, str]:
    """name -> this environment's version, for every distribution the image cannot provide."""
    from packaging.requirements import Requirement

    wanted: dict[str, str] = {}
    todo = [Requirement(root) for root in ROOTS]
    while todo:
        requirement = todo.pop()
        name = normalize(requirement.name)
        if name in wanted:
            continue
        have = image.get(name)
        if have is not None and requirement.specifier.contains(have, prereleases=True):
            continue
        if name in NEVER_CARRIED:
            sys.exit(f"gpu_wheels: the image's {name} {have} does not satisfy {requirement}")
        wanted[name] = metadata.version(name)
        todo += requirements(name)
    return {n: v for n, v in wanted.items() if n not in {normalize(r) for r in ROOTS}}


def main() -> None:
    if sys.argv[1:2] == ["verify"]:  # bench/gpu.sh fetch-wheels: anything not fetched?
        _, missing = pinned_wheels(Path(sys.argv[2]), IMAGE_PYTHON[1])
        if missing:
            sys.exit(f"no wheel for CPython 3.12 x86-64 in {sys.argv[2]}: {', '.join(missing)}")
        print(f"every pin of {WHEELS_LIST.name} has its CPython 3.12 x86-64 wheel")
        return
    if sys.argv[1:2] == ["unpack"]:  # bench/gpu.sh on the GPU machine
        missing = unpack(Path(sys.argv[2]), Path(sys.argv[3]))
        for pin in missing:  # bench/gpu_check.py stops the run if the image lacks it
            print(f"  no wheel for this Python: {pin}")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {WHEELS_LIST.name}")
    args = parser.parse_args()
    pinned = [f"{name}=={version}" for name, version in sorted(carried(image_packages()).items())]
    text = (
        "# The wheels bench/gpu.sh carries to the GPU machine: what the service, the client and\n"
        "# the trainer need that the image (gpu-image-packages.txt) lacks or has too old, pinned\n"
        "# to the local .venv's versions. Written by `bench/gpu_wheels.py --write`; checked by\n"
        "# tests/test_gpu_script.py. Fetch them with `bench/gpu.sh fetch-wheels`.\n"
        "# `make venv` installs with these pins as constraints, so every fresh .venv has these\n"
        "# versions: to move one, edit it here, `make venv`, then `bench/gpu_wheels.py --write`.\n"
        + "".join(pin + "\n" for pin in pinned)
    )
    if args.write:
        WHEELS_LIST.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
