"""Every training method is bit-reproducible: one config and seed, run twice, give the same
per-step losses, the same evaluations and the same checkpoint bytes. Once with the teacher
in the trainer's process (`teacher.in_process`, its default mode: each call is one forward
of what the trainer sent, so its composition is the config's), and once through one
served teacher in deterministic mode (`serve --deterministic`), where the trainer's
micro-batches are in flight together and share the service's forwards as timing decides.
The second time, every forward of that service also scores other sequences, longer than
the trainer's (`Accompanied`): company it never had the first time, every time, where
other clients' calls would land in its forwards only when timing puts them there (tried:
with 2 to 4 such clients the default mode gave the same bytes too, at this size). A
control runs the same pair through a service in its default mode, which moves them.

The methods are scripts/method_fingerprints.py's, configured as it configures them
(`method.loss` keys), on the session's tiny models, 2 steps each. Between the two runs
the global generators are moved, as they would be in a new process; the torch thread
count is this process's both times (1 and 2 threads gave the same bits when tried:
docs/training.md, "Reproducible runs").
"""

from __future__ import annotations

import dataclasses
import importlib.util
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from student_trainer.train import train
from teacher_client import ScoreOptions
from teacher_service import scoring
from teacher_service.backend import HFBackend
from teacher_service.backend_api import ScoreItem
from tests.conftest import start_background_server
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


class Accompanied:
    """The served backend, except that while `company` holds sequences every forward scores
    them too, beside the trainer's (their answers dropped): other clients' sequences in
    the same forwards, every time rather than when timing happens to put them there."""

    def __init__(self, backend: HFBackend) -> None:
        self._backend, self.company = backend, []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def score_batch(self, items):
        scored = self._backend.score_batch([*items, *self.company])
        return dataclasses.replace(scored, scores=scored.scores[: len(items)])


def company(sequences: list[list[int]]) -> list[ScoreItem]:
    """Each of `sequences` twice over: longer than the trainer's (prompt and 6 new tokens),
    so the forwards are wider than the trainer's alone (shorter company can sit in rows of
    its own, and leave the trainer's bytes as they were even in the default mode)."""
    options = scoring.ScoreOptions.from_client(ScoreOptions(top_k=8))
    return [ScoreItem(torch.tensor(s + s[1:]), 1, options) for s in sequences]


def served(model_dir: Path, deterministic: bool):
    backend = Accompanied(
        HFBackend.load(model_dir, device="cpu", dtype="float32", deterministic=deterministic)
    )
    return backend, start_background_server(model_dir, backend, max_wait_ms=20.0)


def run_alone_then_accompanied(
    out: Path, student_dir: Path, method: str, backend: Accompanied, address: str, sequences
) -> tuple[dict[str, Any], dict[str, Any]]:
    overrides = [f"teacher.address={address}", *METHODS[method]]
    backend.company = []
    first = run(out, student_dir, overrides)
    backend.company = company(sequences)
    try:
        return first, run(out, student_dir, overrides)
    finally:
        backend.company = []


@pytest.fixture(scope="module")
def deterministic_service(tiny_model_dir):
    """One served teacher in deterministic mode, for every method's two runs."""
    backend, running = served(tiny_model_dir, deterministic=True)
    yield backend, running.address
    running.stop()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_run_twice_through_a_deterministic_service_gives_the_same_bytes(
    method, tmp_path, deterministic_service, student_model_dir, sequences
):
    backend, address = deterministic_service
    first, again = run_alone_then_accompanied(
        tmp_path / "run", student_model_dir, method, backend, address, sequences
    )
    assert_same(first, again)


def test_through_a_default_mode_service_the_company_moves_a_run_so_the_check_can_fail(
    tmp_path, tiny_model_dir, student_model_dir, sequences
):
    """The control: the same two runs through a service in its default mode (batched as
    usual) give other losses, which is what the mode above removes."""
    backend, running = served(tiny_model_dir, deterministic=False)
    try:
        first, again = run_alone_then_accompanied(
            tmp_path / "run", student_model_dir, "reverse_kl", backend, running.address, sequences
        )
    finally:
        running.stop()
    assert again["losses"] != first["losses"]
    assert again["checkpoint"] != first["checkpoint"]
