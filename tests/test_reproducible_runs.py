"""Bit-reproducible runs: one config and seed, run twice through a served teacher in
deterministic mode (`serve --deterministic`), give the same losses and evaluations and
write the same checkpoint bytes. Between the runs everything else is made to differ: the
global generators hold other states (as a new process's would), and during the second run
another client keeps the service busy with its own sequences, so the trainer's requests
share forwards with other company than the first time (two micro-batches in flight at
once, a step built ahead)."""

from __future__ import annotations

import random
import shutil
import threading

import numpy as np

from student_trainer.train import train
from teacher_client import TeacherClient
from teacher_service.backend import HFBackend
from tests.conftest import start_background_server
from tests.trainer_helpers import small_config


def other_client(
    address: str, sequences: list[list[int]], stop: threading.Event, seed: int
) -> None:
    """Scores shuffled mixes of `sequences` until told to stop."""
    rng = random.Random(seed)
    with TeacherClient(address, timeout=60) as client:
        while not stop.is_set():
            client.score(rng.sample(sequences, 3), 1, top_k=8)


def checkpoint_bytes(out) -> dict[str, bytes]:
    checkpoints = out / "checkpoints"
    return {
        str(path.relative_to(checkpoints)): path.read_bytes()
        for path in sorted(checkpoints.rglob("*"))
        if path.is_file()
    }


def test_a_short_run_twice_through_a_deterministic_service_writes_the_same_bytes(
    tmp_path, tiny_model_dir, student_model_dir, sequences
):
    teacher = HFBackend.load(tiny_model_dir, device="cpu", dtype="float32", deterministic=True)
    running = start_background_server(tiny_model_dir, teacher, max_wait_ms=50.0)
    out = tmp_path / "run"  # the same directory both times: the checkpoint names it
    overrides = [
        f"teacher.address={running.address}",
        "optim.grad_accum=2",
        "rollout.max_staleness=1",
        "run.eval_size=8",
        "run.eval_every=2",
    ]
    runs = []
    try:
        for busy in (False, True):
            shutil.rmtree(out, ignore_errors=True)
            random.random(), np.random.random()  # the generators move, as between processes
            stop = threading.Event()
            noise = [
                threading.Thread(target=other_client, args=(running.address, sequences, stop, n))
                for n in range(4 if busy else 0)
            ]
            for thread in noise:
                thread.start()
            try:
                result = train(small_config(out, student_model_dir, *overrides))
            finally:
                stop.set()
                for thread in noise:
                    thread.join()
            runs.append((result.losses, result.evaluations, checkpoint_bytes(out)))
    finally:
        running.stop()
    (losses, evaluations, files), again = runs
    assert len(losses) == 4 and len(evaluations) == 3 and "trainer_state.pt" in str(list(files))
    assert again[0] == losses
    assert again[1] == evaluations
    assert again[2].keys() == files.keys()
    assert [name for name in files if again[2][name] != files[name]] == []
