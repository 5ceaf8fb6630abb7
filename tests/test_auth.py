"""Bearer-token auth on both front ends: no token or a wrong one is refused before the
engine sees the request, the right one is served, health stays open, and the token is
never written to the service's output."""

from __future__ import annotations

import subprocess
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from teacher_client import TeacherClient, TeacherServiceError
from teacher_service.auth import bearer_matches
from teacher_service.cli import free_port, serve_command
from tests.conftest import start_background_server

TOKEN = "s3cret-token-value"


@pytest.fixture(scope="module")
def guarded(tiny_model_dir, backend):
    running = start_background_server(
        tiny_model_dir, backend, max_wait_ms=2.0, http_port=0, auth_token=TOKEN
    )
    engine = running.running.engine
    calls = []
    original = engine.score

    async def counting_score(*args, **kwargs):
        calls.append(1)
        return await original(*args, **kwargs)

    engine.score = counting_score
    yield running, calls
    running.stop()


def test_bearer_matching():
    assert bearer_matches(f"Bearer {TOKEN}", TOKEN)
    assert bearer_matches(f"bearer {TOKEN}", TOKEN)  # the scheme is case-insensitive
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer "):
        assert not bearer_matches(header, TOKEN)


@pytest.mark.parametrize("token", ["", "wrong-token"])
def test_grpc_refuses_without_the_token_before_the_engine(guarded, sequences, token):
    server, calls = guarded
    before = len(calls)
    with TeacherClient(server.address, timeout=10, token=token) as client:
        with pytest.raises(TeacherServiceError) as refused:
            client.score(sequences, 1, top_k=3)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in refused.value.details
        with pytest.raises(TeacherServiceError):
            client.info()
    assert len(calls) == before


def test_grpc_serves_the_token_and_health_stays_open(guarded, sequences, client):
    server, calls = guarded
    with TeacherClient(server.address, timeout=30, token=TOKEN) as authed:
        got = authed.score(sequences, 1, top_k=3)
    expected = client.score(sequences, 1, top_k=3)  # the unguarded session server
    for a, b in zip(got, expected):
        assert (a.topk_ids == b.topk_ids).all()
    assert calls
    with grpc.insecure_channel(server.address) as channel:  # no credentials at all
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_http_refuses_without_the_token_and_serves_with_it(guarded, sequences):
    server, calls = guarded
    body = {"sequences": [{"token_ids": s, "score_from": 1} for s in sequences], "top_k": 3}
    before = len(calls)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
        refused = httpx.post(f"{server.http_url}/v1/score", json=body, headers=headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in refused.json()["error"]
        assert httpx.post(f"{server.http_url}/v1/completions", headers=headers).status_code == 401
    assert len(calls) == before
    assert httpx.get(f"{server.http_url}/health").status_code == 200
    served = httpx.post(
        f"{server.http_url}/v1/score", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert served.status_code == 200 and len(served.json()["results"]) == len(sequences)
    assert len(calls) == before + 1


def test_the_token_never_appears_in_the_service_output(tiny_model_dir, tmp_path, sequences):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port, http_port = free_port(), free_port()
    command = serve_command(tiny_model_dir, port, "--http-port", str(http_port))
    command += ["--auth-token-file", str(token_file)]
    command[command.index("WARNING")] = "DEBUG"  # the chattiest logging there is
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with TeacherClient(f"127.0.0.1:{port}", timeout=60, token=TOKEN) as client:
            client.wait_until_serving(timeout=120)
            client.score(sequences, 1, top_k=3)
        with (
            TeacherClient(f"127.0.0.1:{port}", timeout=10, token="wrong") as client,
            pytest.raises(TeacherServiceError),
        ):
            client.score(sequences, 1, top_k=3)
        url = f"http://127.0.0.1:{http_port}"
        for token in (TOKEN, "wrong"):
            httpx.get(f"{url}/v1/info", headers={"Authorization": f"Bearer {token}"})
        time.sleep(0.2)
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0].decode()
    assert "auth bearer token" in output  # the start-up line says auth is on ...
    assert TOKEN not in output  # ... and never what the token is
