"""Every training method is bit-reproducible: one config and seed, run twice, give the same
per-step losses, the same evaluations and the same checkpoint bytes. Once with the teacher
in the trainer's process (`teacher.in_process`, its default mode: each call is one forward
of what the trainer sent, so its composition is the config's), and once through one
served teacher in deterministic mode (`serve --deterministic`), where the trainer's
micro-batches are in flight together and share the service's forwards as timing decides;
the second time another client keeps that service busy, so they share them with other
company. (Tried by hand, a default-mode service gave the same bytes too at this size: these
runs show the service path reproduces, not that the mode is what makes it; that the mode's
scores ignore their company is tests/test_deterministic.py's.)

The methods are scripts/method_fingerprints.py's, configured as it configures them
(`method.loss` keys), on the session's tiny models, 2 steps each. Between the two runs
the global generators are moved, as they would be in a new process; the torch thread
count is this process's both times (1 and 2 threads gave the same bits when tried:
docs/training.md, "Reproducible runs").
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from student_trainer.train import train
from teacher_service.backend import HFBackend
from tests.conftest import start_background_server
from tests.test_reproducible_runs import other_client
from tests.trainer_helpers import small_config

ROOT = Path(__file__).resolve().parents[1]


def _methods() -> dict[str, list[str]]:
    """method_fingerprints.METHODS' overrides with `method.loss` (the script stays a
    self-contained file, copied into older checkouts to compare them: not a module)."""
    path = ROOT / "scripts" / "method_fingerprints.py"
    spec = importlib.util.spec_from_file_location("method_fingerprints", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: loss for name, (_legacy, loss) in module.METHODS.items()}


METHODS = _methods()
SHORT = ["optim.steps=2", "run.eval_size=4", "run.eval_every=2"]


def checkpoint_bytes(out: Path) -> dict[str, bytes]:
    checkpoints = out / "checkpoints"
    return {
        str(path.relative_to(checkpoints)): path.read_bytes()
        for path in sorted(checkpoints.rglob("*"))
        if path.is_file()
    }


def run(out: Path, student_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """One run in `out` (the same directory both times: the checkpoint's config names it),
    after moving the global generators away from wherever the last run left them."""
    shutil.rmtree(out, ignore_errors=True)
    random.random(), np.random.random(), torch.rand(1)
    result = train(small_config(out, student_dir, *SHORT, *overrides))
    return {
        "losses": result.losses,
        "evaluations": result.evaluations,
        "checkpoint": checkpoint_bytes(out),
    }


def assert_same(first: dict[str, Any], second: dict[str, Any]) -> None:
    assert len(first["losses"]) == 2 and len(first["evaluations"]) >= 2
    assert any(name.endswith("trainer_state.pt") for name in first["checkpoint"])
    assert second["losses"] == first["losses"]
    assert second["evaluations"] == first["evaluations"]
    assert second["checkpoint"].keys() == first["checkpoint"].keys()
    differ = [n for n, data in first["checkpoint"].items() if second["checkpoint"][n] != data]
    assert differ == []


@pytest.mark.parametrize("method", METHODS)
def test_every_method_run_twice_with_the_in_process_teacher_gives_the_same_bytes(
    method, tmp_path, tiny_model_dir, student_model_dir
):
    overrides = [f"teacher.in_process={tiny_model_dir}", *METHODS[method]]
    first = run(tmp_path / "run", student_model_dir, overrides)
    assert_same(first, run(tmp_path / "run", student_model_dir, overrides))


@pytest.fixture(scope="module")
def deterministic_address(tiny_model_dir):
    """One served teacher in deterministic mode, for every method's two runs."""
    teacher = HFBackend.load(tiny_model_dir, device="cpu", dtype="float32", deterministic=True)
    running = start_background_server(tiny_model_dir, teacher, max_wait_ms=20.0)
    yield running.address
    running.stop()


def run_beside_another_client(
    out: Path, student_dir: Path, overrides: list[str], address: str, sequences
) -> dict[str, Any]:
    """`run`, while another client keeps the service busy with its own sequences: the
    trainer's share forwards with other company than they had alone."""
    stop = threading.Event()
    noise = threading.Thread(target=other_client, args=(address, sequences, stop, 0))
    noise.start()
    try:
        return run(out, student_dir, overrides)
    finally:
        stop.set()
        noise.join()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_run_twice_through_a_deterministic_service_gives_the_same_bytes(
    method, tmp_path, deterministic_address, student_model_dir, sequences
):
    overrides = [f"teacher.address={deterministic_address}", *METHODS[method]]
    first = run(tmp_path / "run", student_model_dir, overrides)
    again = run_beside_another_client(
        tmp_path / "run", student_model_dir, overrides, deterministic_address, sequences
    )
    assert_same(first, again)
