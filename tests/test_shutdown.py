"""SIGTERM under load: health and new calls are refused at once, in-flight calls get the
grace, then an answer (OK, or UNAVAILABLE / 503: never an HTTP 500), and the process exits
within grace + 1 s even with seconds of work still queued. And a trainer whose only
teacher goes away for seconds carries on as if it had not."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from student_trainer.train import Trainer, train
from teacher_client import TeacherClient
from teacher_client.proto import teacher_pb2 as pb
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_service.cli import free_port, serve_command
from tests.replicas import Replica
from tests.trainer_helpers import small_config

GRACE = 1.0
CALLS = 12  # per front end, each with seconds of work between them
SEQUENCES, LENGTH = 64, 480  # per call: 30k tokens
OUTAGE_SECONDS = 5.0


def _queued_sequences(http_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith("teacher_queue_sequences "))
    return float(line.split()[1])


def test_sigterm_under_load_exits_within_grace_and_answers_every_call(tiny_model_dir):
    port, http_port = free_port(), free_port()
    flags = ["--grace-seconds", str(GRACE), "--max-queue-seconds", "100000"]
    command = serve_command(tiny_model_dir, port, "--http-port", str(http_port), *flags)
    process = subprocess.Popen(command)
    try:
        with TeacherClient(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_until_serving(timeout=120)
        ids = [[1] + [(7 * n + i) % 500 + 3 for i in range(LENGTH - 1)] for n in range(SEQUENCES)]
        grpc_codes: list[grpc.StatusCode] = []
        http_statuses: list[int] = []

        def grpc_call() -> None:
            request = pb.ScoreRequest(
                sequences=[pb.Sequence(token_ids=s, score_from=1) for s in ids]
            )
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    pb_grpc.TeacherStub(channel).Score(request, timeout=60)
                    grpc_codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    grpc_codes.append(error.code())

        def http_call() -> None:
            body = {"sequences": [{"token_ids": s, "score_from": 1} for s in ids]}
            answer = httpx.post(f"http://127.0.0.1:{http_port}/v1/score", json=body, timeout=60)
            http_statuses.append(answer.status_code)

        threads = [threading.Thread(target=f) for f in [grpc_call, http_call] * CALLS]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while _queued_sequences(http_port) < SEQUENCES * CALLS:  # most calls are queued
            assert time.monotonic() < deadline, "the load never queued"
            time.sleep(0.05)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            try:  # NOT_SERVING as soon as the signal is handled
                while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1:
                    time.sleep(0.01)
                small = pb.ScoreRequest(sequences=[pb.Sequence(token_ids=[1, 5, 9], score_from=1)])
                pb_grpc.TeacherStub(channel).Score(small, timeout=5)  # a new call: refused
                new_call = grpc.StatusCode.OK
            except grpc.RpcError as error:
                new_call = error.code()
        process.wait(timeout=30)
        exited = time.monotonic() - signalled
        for thread in threads:
            thread.join(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert exited <= GRACE + 1.0, f"exited {exited:.1f} s after SIGTERM"
    assert new_call == grpc.StatusCode.UNAVAILABLE
    assert len(grpc_codes) == len(http_statuses) == CALLS
    assert set(grpc_codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, grpc_codes
    assert set(http_statuses) <= {200, 503}, http_statuses
    # seconds of queued work against a 1 s grace: some calls were cut, and answered so
    assert grpc.StatusCode.UNAVAILABLE in grpc_codes and 503 in http_statuses


def test_the_trainer_survives_an_outage_of_its_only_teacher_with_the_same_losses(
    tiny_model_dir, student_model_dir, tmp_path, monkeypatch
):
    """The teacher is killed after step 2 and comes back 5 s later on the same port: the
    trainer's calls wait it out (retried within teacher.timeout_s), and every step runs
    once, with the losses of an uninterrupted run."""
    replica = Replica(tiny_model_dir).start()
    restarted: list[threading.Thread] = []
    try:
        overrides = ["optim.steps=5", f"teacher.address={replica.address}"]
        healthy = train(small_config(tmp_path / "healthy", student_model_dir, *overrides))
        original_step = Trainer.train_step

        def step_then_kill(self):
            record = original_step(self)
            if self.step == 2:
                replica.kill()
                restart = threading.Timer(OUTAGE_SECONDS, replica.start)
                restart.start()
                restarted.append(restart)
            return record

        monkeypatch.setattr(Trainer, "train_step", step_then_kill)
        started = time.monotonic()
        survived = train(small_config(tmp_path / "outage", student_model_dir, *overrides))
        assert time.monotonic() - started > OUTAGE_SECONDS  # it did wait for the teacher
    finally:
        for restart in restarted:
            restart.join(120)
        if replica.process is not None and replica.process.poll() is None:
            replica.kill()
    logged = [json.loads(x) for x in (tmp_path / "outage" / "metrics.jsonl").open()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5]  # each step once
    assert survived.losses == pytest.approx(healthy.losses, rel=1e-5, abs=1e-7)
