"""Vendor uPlot (MIT) from npm into teacher_service/frontends/http/static/uplot/, for GET
/dashboard.

`make uplot` runs this: `npm pack` of the version VENDOR.json pins, the tarball checked
against the pinned sha512 (npm's `integrity`), then its minified script, stylesheet and
LICENSE written beside VENDOR.json with their sha256. `--check` writes nothing and fails
when the committed files differ from the package's; `--version X` moves the pin to X (its
tarball's sha512 becomes the new pin). tests/test_dashboard_vendor.py checks the committed
files against VENDOR.json's sha256s without the network.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / "teacher_service/frontends/http/static/uplot"
RECORD = DEST / "VENDOR.json"
FILES = {  # file in the npm package -> name under DEST
    "package/dist/uPlot.iife.min.js": "uPlot.iife.min.js",
    "package/dist/uPlot.min.css": "uPlot.min.css",
    "package/LICENSE": "LICENSE",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def integrity(tarball: bytes) -> str:
    """npm's Subresource-Integrity string of a tarball."""
    return "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()


def npm_pack(package: str, version: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["npm", "pack", f"{package}@{version}", "--silent", "--pack-destination", tmp],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (tarball,) = Path(tmp).glob("*.tgz")
        return tarball.read_bytes()


def unpack(tarball: bytes) -> dict[str, bytes]:
    """The files FILES names, by their name under DEST."""
    with tarfile.open(fileobj=io.BytesIO(tarball)) as archive:
        return {name: archive.extractfile(member).read() for member, name in FILES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare only; write nothing")
    parser.add_argument("--version", help="move the pin to this version of the package")
    args = parser.parse_args(argv)
    record = json.loads(RECORD.read_text())
    version = args.version or record["version"]
    tarball = npm_pack(record["package"], version)
    if args.version is None and integrity(tarball) != record["integrity"]:
        print(f"{record['package']}@{version}: the tarball is not the pinned one", file=sys.stderr)
        return 1
    files = unpack(tarball)
    if args.check:
        stale = [name for name, data in files.items() if (DEST / name).read_bytes() != data]
        for name in stale:
            print(f"{DEST / name} differs from {record['package']}@{version}", file=sys.stderr)
        return 1 if stale else 0
    for name, data in files.items():
        (DEST / name).write_bytes(data)
    record.update(
        version=version,
        integrity=integrity(tarball),
        files={name: sha256(data) for name, data in sorted(files.items())},
    )
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    print(f"vendored {record['package']}@{version} into {DEST.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
