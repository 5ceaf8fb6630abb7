"""verl's GKD teacher protocol over ZeroMQ (teacher_service/frontends/zmq_api.py), spoken by a
client written as verl's is (recipe/gkd/teacher/client.py: a REQ socket, torch.save payloads) and
held against gRPC Score / Generate on the same engine."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from teacher_service.cli import free_port, main, serve_command
from teacher_service.config import ServerConfig
from teacher_service.server import BackgroundServer
from tests.conftest import start_background_server

K = 8  # the fixture server's --zmq-top-k


# --- verl's client, mirrored: recipe/gkd/teacher/utils.py and client.py -----------------------


def serialize(data) -> bytes:
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return buffer.getvalue()


def deserialize(message: bytes):
    return torch.load(io.BytesIO(message), weights_only=True)


class VerlClient:
    """TeacherClient.bg_task's socket: REQ, LINGER 0, a receive timeout; one call at a time."""

    def __init__(self, url: str, timeout_ms: int = 60_000) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.REQ)
        self.socket.connect(url)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, timeout_ms)

    def send_bytes(self, payload: bytes) -> dict:
        self.socket.send(payload)
        return deserialize(self.socket.recv())

    def request(self, request) -> dict:
        return self.send_bytes(serialize(request))

    def close(self) -> None:
        self.socket.close()
        self.context.term()

    def __enter__(self) -> VerlClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@pytest.fixture(scope="module")
def zmq_server(tiny_model_dir, backend) -> Iterator[BackgroundServer]:
    running = start_background_server(
        tiny_model_dir, backend, zmq_port=free_port(), zmq_top_k=K, max_wait_ms=2.0
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def grpc_client(zmq_server):
    from teacher_client import TeacherClient

    with TeacherClient(zmq_server.address, timeout=60) as teacher:
        yield teacher


@pytest.fixture
def verl(zmq_server) -> Iterator[VerlClient]:
    with VerlClient(zmq_server.zmq_url) as client:
        yield client


def assert_ok(reply: dict, count: int) -> None:
    assert reply["status"] == "ok", reply
    for key in ("responses", "teacher_topk_logprobs", "teacher_topk_indices"):
        assert isinstance(reply[key], list) and len(reply[key]) == count, key


# --- scoring (max_tokens = 1: verl's GKD trainer) --------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scoring_rows_equal_grpc_scores_topk_exactly_one_row_per_token(
    verl, grpc_client, backend, sequences, temperature
):
    reply = verl.request(
        {"prompt_token_ids": sequences, "max_tokens": 1, "temperature": temperature}
    )
    assert_ok(reply, len(sequences))
    # what the front end computes: Score of the sequence + a placeholder, from 1 (see zmq_api)
    extended = grpc_client.score(
        [[*ids, 0] for ids in sequences], 1, top_k=K, temperature=temperature
    )
    plain = grpc_client.score(sequences, 1, top_k=K, temperature=temperature)
    for ids, response, logprobs, indices, want, score in zip(
        sequences,
        reply["responses"],
        reply["teacher_topk_logprobs"],
        reply["teacher_topk_indices"],
        extended,
        plain,
        strict=True,
    ):
        assert logprobs.dtype == torch.float32 and indices.dtype == torch.int32
        assert logprobs.shape == indices.shape == (len(ids), K)  # one row per token sent
        assert response.dtype == torch.int32 and response.shape == (0,)  # nothing generated
        assert torch.equal(indices, torch.from_numpy(want.topk_ids.copy()))
        assert torch.equal(logprobs, torch.from_numpy(want.topk_logprobs.copy()))
        # rows 0 .. L-2 are Score's rows (position i + 1 given [0, i]), whatever batched them
        np.testing.assert_array_equal(indices[:-1].numpy(), score.topk_ids)
        np.testing.assert_allclose(logprobs[:-1].numpy(), score.topk_logprobs, atol=1e-5)
        # the last row is the next token's distribution: an unbatched in-process forward
        with torch.inference_mode():
            logits = backend.model(torch.tensor([ids])).logits[0, -1, : backend.vocab_size]
        expected = torch.log_softmax(logits.double() / temperature, -1).topk(K)
        np.testing.assert_array_equal(indices[-1].numpy(), expected.indices.numpy())
        np.testing.assert_allclose(logprobs[-1].numpy(), expected.values.numpy(), atol=1e-5)


def test_only_response_returns_the_row_after_the_sequence(verl, sequences):
    full = verl.request({"prompt_token_ids": sequences[:3]})
    only = verl.request({"prompt_token_ids": sequences[:3], "only_response": True})
    assert_ok(only, 3)
    for rows, last in zip(full["teacher_topk_indices"], only["teacher_topk_indices"]):
        assert last.shape == (1, K) and torch.equal(last[0], rows[-1])
    for rows, last in zip(full["teacher_topk_logprobs"], only["teacher_topk_logprobs"]):
        np.testing.assert_allclose(last[0].numpy(), rows[-1].numpy(), atol=1e-5)


def test_tensor_inputs_and_a_request_top_k_are_accepted(verl, sequences):
    ids = sequences[0]
    by_list = verl.request({"prompt_token_ids": [ids], "top_k": 3})
    by_tensor = verl.request({"prompt_token_ids": torch.tensor([ids]), "top_k": 3})
    by_rows = verl.request({"prompt_token_ids": [torch.tensor(ids, dtype=torch.int32)], "top_k": 3})
    for reply in (by_list, by_tensor, by_rows):
        assert_ok(reply, 1)
        assert reply["teacher_topk_indices"][0].shape == (len(ids), 3)
        assert torch.equal(reply["teacher_topk_indices"][0], by_list["teacher_topk_indices"][0])


def test_a_one_token_sequence_gets_one_row(verl, grpc_client):
    reply = verl.request({"prompt_token_ids": [[1]]})
    assert_ok(reply, 1)
    (want,) = grpc_client.score([[1, 0]], 1, top_k=K)
    assert torch.equal(reply["teacher_topk_indices"][0], torch.from_numpy(want.topk_ids.copy()))


# --- generation (max_tokens > 1) -------------------------------------------------------------


def test_generation_returns_responses_and_the_rows_of_prompt_plus_response(
    verl, grpc_client, sequences
):
    prompts = [s[:6] for s in sequences[:3]]
    reply = verl.request({"prompt_token_ids": prompts, "max_tokens": 4, "temperature": 0.0})
    assert_ok(reply, 3)
    greedy = grpc_client.generate(prompts, max_new_tokens=4, temperature=0.0)
    responses = [r.tolist() for r in reply["responses"]]
    assert responses == [g.token_ids for g in greedy]
    expected = grpc_client.score([p + r for p, r in zip(prompts, responses)], 1, top_k=K)
    for prompt, response, indices, want in zip(
        prompts, responses, reply["teacher_topk_indices"], expected
    ):
        assert indices.shape == (len(prompt) - 1 + len(response), K)
        np.testing.assert_array_equal(indices.numpy(), want.topk_ids)
    only = verl.request(
        {"prompt_token_ids": prompts, "max_tokens": 4, "temperature": 0.0, "only_response": True}
    )
    for response, indices, full in zip(
        responses, only["teacher_topk_indices"], reply["teacher_topk_indices"]
    ):
        assert indices.shape == (len(response), K)
        assert torch.equal(indices, full[-len(response) :])


def test_max_tokens_per_sequence_mixes_scoring_and_generation(verl, sequences):
    prompts = [s[:5] for s in sequences[:2]]
    reply = verl.request({"prompt_token_ids": prompts, "max_tokens": [1, 3], "temperature": 0.0})
    assert_ok(reply, 2)
    assert reply["responses"][0].shape == (0,)
    assert 1 <= len(reply["responses"][1]) <= 3
    assert reply["teacher_topk_indices"][0].shape == (5, K)
    assert reply["teacher_topk_indices"][1].shape == (4 + len(reply["responses"][1]), K)


# --- concurrency -----------------------------------------------------------------------------


def test_several_concurrent_clients_get_their_own_answers(zmq_server, verl, sequences):
    alone = [verl.request({"prompt_token_ids": [ids]}) for ids in sequences]
    got: dict[int, dict] = {}

    def call(n: int) -> None:
        with VerlClient(zmq_server.zmq_url) as client:
            for _ in range(3):
                got[n] = client.request({"prompt_token_ids": [sequences[n]]})

    threads = [threading.Thread(target=call, args=(n,)) for n in range(len(sequences))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(got) == list(range(len(sequences)))
    for n, reply in got.items():
        assert_ok(reply, 1)
        want = alone[n]
        assert torch.equal(reply["teacher_topk_indices"][0], want["teacher_topk_indices"][0])
        np.testing.assert_allclose(
            reply["teacher_topk_logprobs"][0], want["teacher_topk_logprobs"][0], atol=1e-5
        )


@contextlib.contextmanager
def dealer_socket(url: str) -> Iterator[zmq.Socket]:
    """A DEALER peer of the server's ROUTER, as verl's proxy has (60 s receive timeout)."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 60_000)
    dealer.connect(url)
    try:
        yield dealer
    finally:
        dealer.close()
        context.term()


def test_a_dealer_pipelining_requests_gets_replies_in_request_order(zmq_server, sequences):
    """verl's proxy is a ROUTER: a DEALER peer may send many requests before reading."""
    with dealer_socket(zmq_server.zmq_url) as dealer:
        order = [5, 0, 3, 1, 4, 2]  # long and short sequences interleaved
        for n in order:
            dealer.send_multipart([b"", serialize({"prompt_token_ids": [sequences[n]]})])
        for n in order:
            empty, payload = dealer.recv_multipart()
            reply = deserialize(payload)
            assert empty == b"" and reply["status"] == "ok"
            assert reply["teacher_topk_indices"][0].shape == (len(sequences[n]), K)
        # without the empty delimiter too
        dealer.send(serialize({"prompt_token_ids": [sequences[0]]}))
        assert deserialize(dealer.recv())["status"] == "ok"


# --- bad input: an error reply naming the field, and the server goes on ------------------------


class RunsCode:
    """A pickle that runs code when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_requests(marker: Path) -> list[tuple[bytes, str, str]]:
    """(payload, kind, the field it names)."""
    ok = {"prompt_token_ids": [[1, 5, 9]]}
    return [
        (b"not a torch payload", "malformed_body", "request"),
        (pickle.dumps(RunsCode(marker)), "malformed_body", "request"),
        (
            serialize({"prompt_token_ids": [[1, 5]], "x": RunsCode(marker)}),
            "malformed_body",
            "request",
        ),
        (serialize([1, 2, 3]), "invalid_argument", "request"),
        (serialize({}), "invalid_argument", "prompt_token_ids"),
        (serialize({"prompt_token_ids": "1 5 9"}), "invalid_argument", "prompt_token_ids"),
        (serialize({"prompt_token_ids": []}), "invalid_argument", "prompt_token_ids"),
        (serialize({"prompt_token_ids": [1, 5, 9]}), "invalid_argument", "prompt_token_ids[0]"),
        (serialize({"prompt_token_ids": [[1, 2.5]]}), "invalid_argument", "prompt_token_ids[0][1]"),
        (
            serialize({"prompt_token_ids": [[1, True]]}),
            "invalid_argument",
            "prompt_token_ids[0][1]",
        ),
        (serialize({"prompt_token_ids": [[]]}), "invalid_argument", "prompt_token_ids[0]"),
        (serialize({"prompt_token_ids": [[1, 512]]}), "invalid_argument", "prompt_token_ids[0][1]"),
        (serialize({"prompt_token_ids": [[1, -3]]}), "invalid_argument", "prompt_token_ids[0][1]"),
        (
            serialize({"prompt_token_ids": torch.tensor([[1.0, 5.0]])}),
            "invalid_argument",
            "prompt_token_ids[0]",
        ),
        (serialize({**ok, "max_tokens": "1"}), "invalid_argument", "max_tokens"),
        (serialize({**ok, "max_tokens": 0}), "invalid_argument", "max_tokens"),
        (serialize({**ok, "max_tokens": [1, 1]}), "invalid_argument", "max_tokens"),
        (serialize({**ok, "max_tokens": 10**9}), "invalid_argument", "prompt_token_ids[0]"),
        (serialize({"prompt_token_ids": [[1] * 512]}), "invalid_argument", "prompt_token_ids[0]"),
        (serialize({**ok, "temperature": "hot"}), "invalid_argument", "temperature"),
        (serialize({**ok, "temperature": -1.0}), "invalid_argument", "temperature"),
        (serialize({**ok, "only_response": 1}), "invalid_argument", "only_response"),
        (serialize({**ok, "top_k": 0}), "invalid_argument", "top_k"),
        (serialize({**ok, "topk": 5}), "invalid_argument", "topk"),
        (serialize({"prompt_token_ids": [[1] * 5000]}), "invalid_argument", "prompt_token_ids[0]"),
    ]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the raw pickle
def test_malformed_requests_get_an_error_reply_naming_the_field_and_serving_goes_on(
    verl, sequences, tmp_path, backend
):
    assert backend.vocab_size == 512  # the out-of-vocabulary cases above
    marker = tmp_path / "pwned"
    for payload, kind, field in bad_requests(marker):
        reply = verl.send_bytes(payload)
        assert reply["status"] == "error", (field, reply)
        assert (reply["kind"], reply["field"]) == (kind, field), reply
        assert field in reply["reason"]
        assert not marker.exists(), "torch.load ran code from a request"
    good = verl.request({"prompt_token_ids": [sequences[0]]})
    assert_ok(good, 1)


def test_a_multi_frame_body_gets_an_error_reply(zmq_server, verl, sequences):
    with dealer_socket(zmq_server.zmq_url) as dealer:
        dealer.send_multipart([b"", b"one", b"two"])
        _, payload = dealer.recv_multipart()
        reply = deserialize(payload)
        assert reply["status"] == "error" and reply["kind"] == "malformed_body"
    assert_ok(verl.request({"prompt_token_ids": [sequences[1]]}), 1)


def test_requests_are_counted_in_the_metrics(zmq_server, verl, sequences):
    verl.request({"prompt_token_ids": [sequences[0]]})
    verl.send_bytes(b"garbage")
    text = zmq_server.running.engine.metrics.render().decode()
    assert 'teacher_requests_total{frontend="zmq",method="GKD",status="OK"}' in text
    assert 'frontend="zmq",method="GKD",status="INVALID_ARGUMENT"' in text


# --- lifecycle -------------------------------------------------------------------------------


def test_a_stopping_engine_answers_shutting_down_and_stop_frees_the_port(tiny_model_dir, backend):
    port = free_port()
    running = start_background_server(tiny_model_dir, backend, grpc=False, zmq_port=port)
    with VerlClient(running.zmq_url) as client:
        assert_ok(client.request({"prompt_token_ids": [[1, 5, 9]]}), 1)
        running.call(running.running.engine.batcher.close())  # as at the end of the grace
        reply = client.request({"prompt_token_ids": [[1, 5, 9]]})
        assert reply["status"] == "error" and reply["kind"] == "shutting_down", reply
        started = time.monotonic()
        running.stop()
        assert time.monotonic() - started < 10
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    try:
        socket.bind(f"tcp://127.0.0.1:{port}")  # the port is free again
    finally:
        socket.close(linger=0)
        context.term()


def test_serve_zmq_only_answers_verl_and_exits_cleanly_on_sigterm(tiny_model_dir, sequences):
    port = free_port()
    flags = ("--no-grpc", "--zmq-port", str(port), "--zmq-top-k", "5", "--grace-seconds", "1")
    process = subprocess.Popen(
        serve_command(tiny_model_dir, 0, *flags),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # a REQ socket queues the request until the server binds: no polling needed
        with VerlClient(f"tcp://127.0.0.1:{port}", timeout_ms=120_000) as client:
            reply = client.request({"prompt_token_ids": [sequences[0]]})
        assert_ok(reply, 1)
        assert reply["teacher_topk_indices"][0].shape == (len(sequences[0]), 5)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert f"listening on tcp://127.0.0.1:{port} (ZeroMQ" in output


def test_the_zmq_flags_reach_the_config_and_a_public_zmq_host_needs_no_auth(
    monkeypatch, tiny_model_dir
):
    from teacher_service import server

    seen = []
    monkeypatch.setattr(server, "serve", seen.append)
    flags = ["--zmq-port", "15555", "--zmq-host", "::1", "--zmq-top-k", "64"]
    main(["serve", "--model", str(tiny_model_dir), *flags])
    (config,) = seen
    assert (config.zmq_port, config.zmq_host, config.zmq_top_k) == (15555, "::1", 64)
    assert ServerConfig(model="m").zmq_port == 0  # off by default
    assert ServerConfig(model="m").zmq_host == "127.0.0.1"
    with pytest.raises(ValueError, match="no auth and no TLS"):
        ServerConfig(model="m", zmq_port=1, zmq_host="0.0.0.0", auth_token="t")
    ServerConfig(model="m", zmq_port=1, zmq_host="localhost", auth_token="t")  # loopback: fine
    with pytest.raises(ValueError, match="zmq_top_k"):
        ServerConfig(model="m", zmq_top_k=0)
