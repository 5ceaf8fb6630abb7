"""bench/gpu.sh's first step: can this interpreter run everything the script runs?

    python bench/gpu_check.py cuda|cpu       # with bench/gpu.sh's PYTHONPATH

Three checks, every problem listed before it stops (exit status 1):
1. every carried package (bench/gpu-wheels.txt) is found at its pinned version: the wheels
   were fetched, unpacked and come first on the path, ahead of the image's older copies;
2. every module of the service, the client and the trainer imports, and so does every
   third-party module that an import statement of the code the script runs names: a lazy
   import inside a function (datasets, matplotlib, zmq, ...) fails here, not minutes into
   a measurement (OPTIONAL: the extras' packages, for features the script does not use);
3. torch sees a CUDA device (cuda), and the generated stubs' grpcio and protobuf are new
   enough (their own check, run when teacher_pb2_grpc imports).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as metadata
import pkgutil
import sys
from pathlib import Path

from gpu_wheels import pins

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "teacher_service",
    "student_trainer",
    "causal_lm",
    "distill_lab",
    "teacher-client/teacher_client",
)
BENCHES = ("bench/bench_service.py", "bench/bench_trainer.py", "bench/trl_reference.py")
BENCHES += ("bench/gpu_check.py", "bench/gpu_wheels.py")
FIRST_PARTY = {package.split("/")[-1] for package in PACKAGES}
FIRST_PARTY |= {path.stem for path in (ROOT / "bench").glob("*.py")}  # on the benches' path
OPTIONAL = {  # imported only by features gpu.sh does not use
    "trl": "teacher_client.trl and bench/trl_reference.py: TRL, the client's trl extra",
    "peft": "student_trainer/lora.py, for student.lora: the lora extra",
}


def source_files() -> list[Path]:
    files = [ROOT / b for b in BENCHES]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def third_party_imports(files: list[Path]) -> set[str]:
    """The top-level names of every absolute import statement, wherever it sits, that are
    neither the standard library nor this repository."""
    found = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {name.split(".")[0] for name in names}
    return found - set(sys.stdlib_module_names) - FIRST_PARTY - {"__future__"}


def project_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        top = Path(package).name
        module = importlib.import_module(top)
        names.append(top)
        for info in pkgutil.walk_packages(module.__path__, prefix=f"{top}."):
            names.append(info.name)
    # a package's __main__ runs its CLI when imported
    return [n for n in names if n.split(".")[-1] not in {*OPTIONAL, "__main__"}]


def problems() -> list[str]:
    found = []
    for name, version in pins().items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            found.append(f"{name}=={version}: not installed")
            continue
        if have != version:
            found.append(f"{name}=={version}: found {have} first on the path")
    imports = sorted(third_party_imports(source_files()) - set(OPTIONAL))
    modules = imports + [m for m in project_modules() if m not in imports]
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as error:  # ImportError, or a stub's own version check
            found.append(f"import {name}: {type(error).__name__}: {error}")
    return found


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    found = problems()
    import torch

    line = f"  python {sys.version.split()[0]}, torch {torch.__version__}"
    if device == "cuda":
        if torch.cuda.is_available():
            line += f", {torch.cuda.get_device_name(0)}"
        else:
            found.append("torch sees no CUDA device")
    else:
        line += " (dry run on CPU)"
    print(line)
    if found:
        print("bench/gpu.sh: cannot run here:\n  " + "\n  ".join(found), file=sys.stderr)
        print(
            "carry the missing packages as wheels: `bench/gpu.sh fetch-wheels` (see the top "
            "of bench/gpu.sh); bench/gpu_wheels.py derives bench/gpu-wheels.txt",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
