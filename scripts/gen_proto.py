"""Regenerate the gRPC code in teacher-client/teacher_client/proto/ from protos/teacher.proto.

`make proto` runs this; tests/test_proto.py runs it into a temporary folder and fails
when the committed code differs (a stale contract). The `-I<package path>=protos`
mapping makes protoc write package-absolute imports, so no post-editing is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ROOT = "teacher-client"  # the client distribution owns the generated stubs
PACKAGE_DIR = "teacher_client/proto"


def generate(out_root: Path) -> list[Path]:
    """Write teacher_pb2.py, teacher_pb2.pyi and teacher_pb2_grpc.py under out_root/PACKAGE_DIR."""
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_DIR}={ROOT / 'protos'}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"{PACKAGE_DIR}/teacher.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on protos/teacher.proto")
    return sorted((out_root / PACKAGE_DIR).glob("teacher_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=ROOT / CLIENT_ROOT, help="root to write PACKAGE_DIR under"
    )
    for path in generate(parser.parse_args().out):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
