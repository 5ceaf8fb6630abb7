"""The command line as users run it: a real `teacher-service serve` process, SIGTERM to stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from teacher_client import TeacherClient
from teacher_service.cli import free_port, serve_command
from tests.conftest import reference_logprobs


def test_serve_scores_and_shuts_down_cleanly_on_sigterm(tiny_model_dir, backend, sequences):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "teacher_service",
            "serve",
            "--model",
            str(tiny_model_dir),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--max-wait-ms",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with TeacherClient(f"127.0.0.1:{port}", timeout=30) as teacher:
            teacher.wait_until_serving(timeout=120)
            ids = sequences[0]
            (result,) = teacher.score([ids], 1, top_k=0)
            expected = reference_logprobs(backend, ids)[:-1].numpy()  # same weights, in-process
            np.testing.assert_allclose(
                result.target_logprobs, expected[np.arange(len(ids) - 1), ids[1:]], atol=1e-5
            )
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert f"listening on 127.0.0.1:{port}" in output
    assert "shutting down" in output


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "{missing}"], "no config.json"),
        (["--model", "{model}", "--dtype", "int8"], "invalid choice"),
        (["--model", "{model}", "--max-batch-tokens", "0"], "max_batch_tokens must be >= 1"),
        (["--model", "{model}", "--backend", "openai"], "--upstream URL goes with"),
        (["--model", "{model}", "--upstream", "http://x"], "--upstream URL goes with"),
        (["--model", "{model}", "--no-grpc"], "every front end is off"),
        (["--model", "{model}", "--threads", "-1"], "threads must be >= 0 (0: automatic)"),
    ],
)
def test_serve_refuses_bad_flags_with_a_clear_message(tiny_model_dir, tmp_path, flags, message):
    paths = {"missing": tmp_path / "nope", "model": tiny_model_dir}
    command = [sys.executable, "-m", "teacher_service", "serve"]
    command += [flag.format(**paths) for flag in flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples over its labels, in /metrics' text."""
    lines = [x for x in text.splitlines() if x.startswith((name + " ", name + "{"))]
    assert lines, f"{name} is not in /metrics"
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines)


def test_http_only_server_answers_with_its_heap_frozen_and_stops_on_sigterm(
    tiny_model_dir, sequences
):
    port = free_port()
    process = subprocess.Popen(
        serve_command(tiny_model_dir, 0, "--no-grpc", "--http-port", str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
            time.sleep(0.2)
        answer = httpx.post(
            f"{url}/v1/score", json={"sequences": [{"token_ids": sequences[0], "score_from": 1}]}
        )
        assert answer.status_code == 200
        assert len(answer.json()["results"][0]["target_logprobs"]) == len(sequences[0]) - 1
        metrics = httpx.get(f"{url}/metrics").text
        # torch, transformers and the model: far more than this, out of the collector's walks
        assert metric(metrics, "teacher_gc_frozen_objects") > 50_000
        assert metric(metrics, "teacher_gc_pause_seconds_count") >= 1  # serving collected
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert f"listening on http://127.0.0.1:{port}" in output
    assert "(gRPC)" not in output


def health(*flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "teacher_service", "health", *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_health_command_exits_0_only_when_serving(server):
    """What Docker's HEALTHCHECK runs, against the tiny model served on loopback."""
    done = health("--address", server.address)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{server.address} (server): SERVING"
    done = health("--address", server.address, "--service", "teacher.v1.Teacher")
    assert done.returncode == 0 and "teacher.v1.Teacher: SERVING" in done.stdout
    unknown = health("--address", server.address, "--service", "no.such.Service")
    assert unknown.returncode == 1
    assert "does not know service no.such.Service" in unknown.stderr
    nobody = health("--address", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert nobody.returncode == 1 and nobody.stdout == ""
    assert "cannot reach 127.0.0.1:" in nobody.stderr


def test_health_command_exits_1_when_not_serving():
    """A draining server reports NOT_SERVING: the check must fail, not just connect."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health as grpc_health
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    bare = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = grpc_health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, bare)
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    try:
        done = health("--address", f"127.0.0.1:{port}")
    finally:
        bare.stop(None)
    assert done.returncode == 1
    assert done.stdout.strip() == f"127.0.0.1:{port} (server): NOT_SERVING"
