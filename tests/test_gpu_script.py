"""bench/gpu.sh runs as shipped on the GPU machine, which has no network: everything the code
it runs imports is either in the machine's image (bench/gpu-image-packages.txt, a copy of
../shared/gpu-image-packages.txt) at a version the project's requirements accept, or
carried as a wheel (bench/gpu-wheels.txt). Checked from the source itself: every import
statement of the service, the client, the trainer and the benches the script runs, mapped
to the distributions installed here, and their requirements walked for Python 3.12 on
Linux x86-64. The script's own first step (bench/gpu_check.py) is run here too: it must
pass where everything is installed and name what is missing where something is not.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
GPU_SH = BENCH / "gpu.sh"
IMAGE_COPY = BENCH / "gpu-image-packages.txt"
SHARED_IMAGE = ROOT.parent / "shared" / "gpu-image-packages.txt"
WHEELS_LIST = BENCH / "gpu-wheels.txt"
PACKAGES = [
    ROOT / "teacher_service",
    ROOT / "student_trainer",
    ROOT / "causal_lm",
    ROOT / "distill_lab",
    ROOT / "teacher-client" / "teacher_client",
]
FIRST_PARTY = {package.name for package in PACKAGES}
OURS = {"teacher-service", "teacher-client"}  # their requirements are walked, never carried
OPTIONAL = {"trl"}  # teacher_client.trl and bench/trl_reference.py: not installed here

sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402
import gpu_wheels  # noqa: E402

# --- what the script runs, and what that imports ---------------------------------------------


def pip_list(path: Path) -> dict[str, str]:
    rows = [line.split() for line in path.read_text().splitlines() if not line.startswith("#")]
    return {canonicalize_name(r[0]): r[1] for r in rows[2:] if len(r) == 2}


def wheel_pins() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in WHEELS_LIST.read_text().splitlines()]
    return {canonicalize_name(n): v for n, _, v in (s.partition("==") for s in lines if s)}


def imported_names(path: Path) -> set[str]:
    """The modules an absolute import statement anywhere in the file names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def files_the_script_runs() -> list[Path]:
    """The packages, the bench scripts gpu.sh names, and the bench modules those import
    (they put bench/ on sys.path)."""
    files = [f for package in PACKAGES for f in sorted(package.rglob("*.py"))]
    todo = sorted(set(re.findall(r"bench/(\w+)\.py", GPU_SH.read_text())))
    seen: set[str] = set()
    while todo:
        stem = todo.pop()
        if stem in seen:
            continue
        seen.add(stem)
        files.append(BENCH / f"{stem}.py")
        tops = {name.split(".")[0] for name in imported_names(BENCH / f"{stem}.py")}
        todo += [top for top in tops if (BENCH / f"{top}.py").is_file()]
    return files


def third_party(files: list[Path]) -> set[str]:
    tops = {name.split(".")[0] for path in files for name in imported_names(path)}
    bench = {path.stem for path in BENCH.glob("*.py")}
    return tops - set(sys.stdlib_module_names) - FIRST_PARTY - bench - {"__future__"}


def declared(name: str) -> list[str]:
    """Ours: the tree's pyproject.toml (ahead of an editable install's metadata); any other
    distribution: its installed metadata."""
    pyproject = {"teacher-service": ROOT, "teacher-client": ROOT / "teacher-client"}.get(name)
    if pyproject is None or sys.version_info < (3, 11):
        return metadata.distribution(name).requires or []
    import tomllib

    return tomllib.loads((pyproject / "pyproject.toml").read_text())["project"]["dependencies"]


@functools.cache
def distribution_of(module: str) -> str | None:
    """The installed distribution that provides a top-level module (of several sharing a
    namespace, google's, the one whose files hold it)."""
    candidates = metadata.packages_distributions().get(module, [])
    if len(candidates) > 1:
        candidates = [
            c
            for c in candidates
            if any(str(f).startswith(f"{module}/") for f in metadata.files(c) or [])
        ]
    return canonicalize_name(candidates[0]) if candidates else None


def problems(
    modules: set[str], image: dict[str, str], carried: dict[str, str]
) -> tuple[list[str], set[str]]:
    """What the GPU machine would lack, and the distributions carried: the imported modules'
    distributions and our distributions' requirements, walked through what is carried."""
    found, walked = [], set()
    todo: list[tuple[str, Requirement]] = []
    for module in sorted(modules):
        name = distribution_of(module)
        if name is None:
            if module not in OPTIONAL:
                found.append(f"import {module}: no installed distribution provides it")
        else:
            todo.append((f"import {module}", Requirement(name)))
    todo += [("the project", Requirement(name)) for name in sorted(OURS)]
    while todo:
        why, requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name not in OURS:
            if name in image and requirement.specifier.contains(image[name], prereleases=True):
                continue  # the image's, and its own requirements are the image's business
            if name not in carried:
                have = f"the image has {image[name]}" if name in image else "not in the image"
                found.append(f"{name}{requirement.specifier} ({why}): {have}, not carried")
                continue
            if not requirement.specifier.contains(carried[name], prereleases=True):
                found.append(f"{name}=={carried[name]} carried, {why} wants {requirement}")
                continue
        if name in walked:
            continue
        walked.add(name)
        for text in declared(name):
            sub = Requirement(text)
            if sub.marker is None or sub.marker.evaluate(gpu_wheels.TARGET):
                todo.append((f"{name} requires", sub))
    return found, walked - OURS


@pytest.fixture(scope="module")
def imports() -> set[str]:
    return third_party(files_the_script_runs())


# --- the lists --------------------------------------------------------------------------------


def test_the_image_list_is_the_shared_one_where_that_exists():
    if not SHARED_IMAGE.is_file():
        pytest.skip(f"{SHARED_IMAGE} is not here (a clean clone): the copy stands alone")
    assert pip_list(IMAGE_COPY) == pip_list(SHARED_IMAGE)


def test_the_image_copy_says_where_it_came_from_and_lists_the_image():
    header = IMAGE_COPY.read_text().splitlines()[:3]
    assert "../shared/gpu-image-packages.txt" in header[0]
    image = pip_list(IMAGE_COPY)
    assert image["torch"].startswith("2.") and len(image) > 150


def test_every_import_of_the_code_the_script_runs_is_in_the_image_or_carried(imports):
    found, _ = problems(imports, pip_list(IMAGE_COPY), wheel_pins())
    assert found == [], "add these to bench/gpu-wheels.txt (bench/gpu_wheels.py --write):\n" + (
        "\n".join(found)
    )


def test_nothing_is_carried_that_the_code_does_not_need(imports):
    _, used = problems(imports, pip_list(IMAGE_COPY), wheel_pins())
    assert set(wheel_pins()) - used == set()


def test_torch_is_the_images_and_never_carried(imports):
    image = pip_list(IMAGE_COPY)
    assert "torch" not in wheel_pins()
    assert "torch" in {distribution_of(m) for m in imports}
    wanted = [Requirement(r) for r in declared("teacher-service")]
    (torch,) = [r for r in wanted if r.name == "torch"]
    assert torch.specifier.contains(image["torch"])


def test_a_new_import_the_image_lacks_and_nothing_carries_fails_the_check(imports):
    image, carried = pip_list(IMAGE_COPY), wheel_pins()
    assert "jsonschema" not in image and "jsonschema" not in carried  # a dev dependency here
    found, _ = problems(imports | {"jsonschema"}, image, carried)
    assert any(line.startswith("jsonschema") for line in found), found
    found, _ = problems(imports | {"not_installed_anywhere"}, image, carried)
    assert found == ["import not_installed_anywhere: no installed distribution provides it"]


def test_a_package_the_image_has_too_old_must_be_carried(imports):
    image, carried = pip_list(IMAGE_COPY), wheel_pins()
    # transformers: the project wants >= 5.23, the image has 5.17; grpcio: the stubs want
    # >= 1.85.1, the image has 1.84.0
    for name in ("transformers", "grpcio"):
        found, _ = problems(imports, image, {n: v for n, v in carried.items() if n != name})
        line = f"the image has {image[name]}, not carried"
        assert any(f.startswith(name) and line in f for f in found), found


def test_the_derived_list_names_what_the_lists_in_the_repository_name():
    assert set(gpu_wheels.carried(gpu_wheels.image_packages())) == set(wheel_pins())


# --- the script's own check, and its wheels --------------------------------------------------


def test_the_scripts_check_imports_every_third_party_module_the_code_names(imports):
    assert set(gpu_check.source_files()) == set(files_the_script_runs())
    checked = gpu_check.third_party_imports(gpu_check.source_files()) - set(gpu_check.OPTIONAL)
    assert checked == imports - set(gpu_check.OPTIONAL)
    assert set(gpu_check.OPTIONAL) >= OPTIONAL


def test_the_scripts_check_passes_here_and_names_a_missing_module_and_a_wrong_version(tmp_path):
    (tmp_path / "num2words").mkdir()
    (tmp_path / "num2words" / "__init__.py").write_text("raise ImportError('not carried')\n")
    info = tmp_path / "pyzmq-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pyzmq\nVersion: 1.0\n")
    path = [str(tmp_path), str(ROOT), str(ROOT / "teacher-client")]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    listed = [line.strip() for line in done.stderr.splitlines() if line.startswith("  ")]
    expected = {f"pyzmq=={wheel_pins()['pyzmq']}: found 1.0 first on the path"}
    for name, version in wheel_pins().items():  # where this environment differs from a pin
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            expected.add(f"{name}=={version}: not installed")
            continue
        if name != "pyzmq" and have != version:
            expected.add(f"{name}=={version}: found {have} first on the path")
    assert {line for line in listed if not line.startswith("import ")} == expected
    # the module first, then every project module that imports it at its top
    failed = [line for line in listed if line.startswith("import ")]
    assert failed[0] == "import num2words: ImportError: not carried"
    assert {line.split(":", 1)[1] for line in failed} == {" ImportError: not carried"}
    assert "import student_trainer.tasks: ImportError: not carried" in failed


def test_fetch_wheels_asks_pip_for_every_pin_for_cpython_312(tmp_path):
    log = tmp_path / "pip.log"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = os.environ | {"PIP_PYTHON": str(fake), "WHEELS": str(tmp_path / "wheels")}
    subprocess.run([str(GPU_SH), "fetch-wheels"], env=env, check=True, capture_output=True)
    calls = log.read_text().splitlines()
    downloads = [c.split() for c in calls if " download " in c]
    assert [c[-1] for c in downloads] == [f"{n}=={v}" for n, v in wheel_pins().items()]
    for call in downloads:
        assert {"--no-deps", "--only-binary=:all:", "--implementation", "cp"} <= set(call)
        assert call[call.index("--python-version") + 1] == "3.12"
    assert calls[-1] == f"bench/gpu_wheels.py verify {tmp_path / 'wheels'}"


def wheel(folder: Path, name: str, files: dict[str, str]) -> Path:
    path = folder / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_only_the_pinned_wheels_that_fit_the_python_are_unpacked(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_wheels, "pins", lambda: {"grpcio": "1.85.3", "tomlkit": "0.15.3"})
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    minor = sys.version_info.minor
    wheel(wheels, f"grpcio-1.85.3-cp3{minor}-cp3{minor}-manylinux_2_17_x86_64.whl", {"grpc/a": ""})
    wheel(wheels, "grpcio-1.85.3-cp39-cp39-manylinux_2_17_x86_64.whl", {"grpc/b": ""})
    wheel(wheels, f"grpcio-1.80.0-cp3{minor}-cp3{minor}-manylinux_2_17_x86_64.whl", {"grpc/c": ""})
    wheel(wheels, "tomlkit-0.15.3-py3-none-win_amd64.whl", {"tomlkit/d": ""})
    assert gpu_wheels.unpack(wheels, site) == ["tomlkit==0.15.3"]
    assert sorted(p.name for p in (site / "grpc").iterdir()) == ["a"]
    wheel(wheels, "tomlkit-0.15.3-py3-none-any.whl", {"tomlkit-0.15.3.data/purelib/tomlkit/e": ""})
    assert gpu_wheels.unpack(wheels, site) == []
    assert (site / "tomlkit" / "e").is_file() and not list(site.glob("*.data"))


def test_a_stable_abi_wheel_fits_later_pythons_and_a_py312_wheel_only_312():
    fits = gpu_wheels.fits
    assert fits(Path("pyzmq-27.3.0-cp312-abi3-manylinux_2_28_x86_64.whl"), 13)
    assert not fits(Path("pyzmq-27.3.0-cp312-abi3-manylinux_2_28_x86_64.whl"), 11)
    assert fits(Path("multiprocess-0.70.19-py312-none-any.whl"), 12)
    assert not fits(Path("multiprocess-0.70.19-py311-none-any.whl"), 12)
    assert fits(Path("docopt-0.6.2-py2.py3-none-any.whl"), 12)
    assert not fits(Path("grpcio-1.85.3-cp312-cp312-macosx_11_0_universal2.whl"), 12)
