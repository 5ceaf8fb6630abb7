"""Overload at the gRPC door and in Generate: calls past --grpc-max-concurrent-rpcs are
refused at once, a ScoreStream refusal carries the retry hint that a unary one sends as
trailing metadata (and the stream goes on), and Generate stops at the caller's deadline
before chunks of prompts nobody would read."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from teacher_client import AsyncTeacherClient, TeacherClient, TeacherServiceError
from teacher_client.proto import teacher_pb2 as pb
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_service import cli
from teacher_service.config import Limits, ServerConfig
from teacher_service.server import BackgroundServer
from tests.conftest import GatedBackend, busy_limits, start_background_server

pytestmark = pytest.mark.timeout(60)
CAP_REFUSAL = "Concurrent RPC limit exceeded!"  # gRPC core's words, past the cap
MAX_NEW_TOKENS = 8


@pytest.fixture
def gated(backend) -> Iterator[GatedBackend]:
    gated = GatedBackend(backend)
    yield gated
    gated.gate.set()  # a failed test leaves no forward waiting


@pytest.fixture
def serve(tiny_model_dir, gated) -> Iterator[Callable[..., BackgroundServer]]:
    """Start a server on the gated backend with these settings; stopped after the test."""
    started: list[BackgroundServer] = []

    def start(**config) -> BackgroundServer:
        started.append(start_background_server(tiny_model_dir, gated, max_wait_ms=0.0, **config))
        return started[-1]

    yield start
    gated.gate.set()
    for running in started:
        running.stop()


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def _dropped(server: BackgroundServer, reason: str) -> float:
    registry = server.running.engine.metrics.registry
    return registry.get_sample_value("teacher_sequences_dropped_total", {"reason": reason}) or 0.0


def _score_request(token_ids: list[int] | list[list[int]], request_id: str = "") -> pb.ScoreRequest:
    """One sequence, or several."""
    batch = token_ids if isinstance(token_ids[0], list) else [token_ids]
    return pb.ScoreRequest(
        sequences=[pb.Sequence(token_ids=ids, score_from=1) for ids in batch],
        top_k=2,
        request_id=request_id,
    )


# --- the cap on concurrent gRPC calls -----------------------------------------------------


def test_past_the_grpc_call_cap_a_call_is_refused_at_once_and_served_once_calls_end(
    serve, gated, sequences, backend
):
    server = serve(grpc_max_concurrent_rpcs=2)
    gated.gate.clear()
    request = _score_request(sequences[0])
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TeacherStub(channel)
        first = stub.Score.future(request, timeout=30)
        assert gated.entered.wait(10)  # in a forward, held at the gate
        second = stub.Score.future(request, timeout=30)
        _until(lambda: server.running.engine.batcher.pending == 1)  # queued behind it
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Info(pb.InfoRequest(), timeout=10)
        assert time.monotonic() - started < 1.0  # at once, not after the calls in flight
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == CAP_REFUSAL
        assert not refused.value.trailing_metadata()  # no retry hint: clients do not retry it
        with pytest.raises(grpc.RpcError) as probe:  # health checks count against the cap too
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert probe.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with TeacherClient(server.address, timeout=10) as teacher:
            started = time.monotonic()
            with pytest.raises(TeacherServiceError) as raised:  # raised at once, not retried
                teacher.info()
            assert time.monotonic() - started < 1.0
        assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert raised.value.details == CAP_REFUSAL and raised.value.retry_after is None
        gated.gate.set()
        answers = [first.result(30), second.result(30)]
        rows = len(sequences[0]) - 1
        assert [list(a.results[0].topk_ids.shape) for a in answers] == [[rows, 2]] * 2
        assert stub.Info(pb.InfoRequest(), timeout=10).vocab_size == backend.vocab_size


def test_serve_takes_the_grpc_call_cap_and_refuses_a_cap_below_one(monkeypatch, tiny_model_dir):
    seen: list[ServerConfig] = []
    monkeypatch.setattr("teacher_service.server.serve", seen.append)
    cli.main(["serve", "--model", str(tiny_model_dir), "--grpc-max-concurrent-rpcs", "7"])
    assert seen[0].grpc_max_concurrent_rpcs == 7
    assert ServerConfig(model="m").grpc_max_concurrent_rpcs == 1024
    with pytest.raises(ValueError, match="grpc_max_concurrent_rpcs must be >= 1, got 0"):
        ServerConfig(model="m", grpc_max_concurrent_rpcs=0)


def test_serve_takes_the_worker_nice_and_refuses_one_the_kernel_would_not_grant(
    monkeypatch, tiny_model_dir
):
    seen: list[ServerConfig] = []
    monkeypatch.setattr("teacher_service.server.serve", seen.append)
    cli.main(["serve", "--model", str(tiny_model_dir), "--worker-nice", "3"])
    assert seen[0].worker_nice == 3
    assert ServerConfig(model="m").worker_nice == 10
    for nice in (-1, 20):  # below 0 needs privileges; 19 is the kernel's last step
        with pytest.raises(ValueError, match=rf"worker_nice must be in \[0, 19\], got {nice}"):
            ServerConfig(model="m", worker_nice=nice)


def test_serve_freezes_the_heap_unless_told_not_to(monkeypatch, tiny_model_dir):
    seen: list[ServerConfig] = []
    monkeypatch.setattr("teacher_service.server.serve", seen.append)
    cli.main(["serve", "--model", str(tiny_model_dir)])
    cli.main(["serve", "--model", str(tiny_model_dir), "--no-freeze-heap"])
    assert [config.freeze_heap for config in seen] == [True, False]


def test_serve_takes_the_queue_budget_in_forwards_and_can_skip_the_warm_up(
    monkeypatch, tiny_model_dir
):
    seen: list[ServerConfig] = []
    monkeypatch.setattr("teacher_service.server.serve", seen.append)
    cli.main(["serve", "--model", str(tiny_model_dir)])
    cli.main(["serve", "--model", str(tiny_model_dir), "--max-queue-forwards", "inf"])
    cli.main(["serve", "--model", str(tiny_model_dir), "--max-queue-forwards", "1.5"])
    cli.main(["serve", "--model", str(tiny_model_dir), "--no-warm-up"])
    assert [c.limits.max_queue_forwards for c in seen] == [2.0, float("inf"), 1.5, 2.0]
    assert [c.warm_up for c in seen] == [True, True, True, False]
    for forwards in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="max_queue_forwards must be > 0"):
            Limits(max_queue_forwards=forwards)


# --- ScoreStream's refusals -----------------------------------------------------------------


def test_a_refused_score_stream_request_carries_the_retry_hint_and_the_stream_goes_on(
    serve, gated, sequences
):
    server = serve(limits=busy_limits(sequences[:3]))
    gated.gate.clear()
    outbox: queue.Queue[pb.ScoreRequest | None] = queue.Queue()
    with grpc.insecure_channel(server.address) as channel:
        responses = pb_grpc.TeacherStub(channel).ScoreStream(iter(outbox.get, None), timeout=30)
        outbox.put(_score_request(sequences[0], "held"))
        assert gated.entered.wait(10)  # in a forward, held at the gate
        outbox.put(_score_request(sequences[1:3], "queued"))  # more than a forward holds
        _until(lambda: server.running.engine.batcher.pending == 2)
        outbox.put(_score_request(sequences[2], "refused"))
        refused = next(responses)  # answered at once, while the others wait
        assert refused.request_id == "refused" and refused.WhichOneof("outcome") == "error"
        assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "max_queue_forwards" in refused.error.message
        assert refused.error.HasField("retry_after_s") and refused.error.retry_after_s > 0
        gated.gate.set()
        served = {r.request_id: r for r in (next(responses), next(responses))}
        assert set(served) == {"held", "queued"}
        assert all(r.WhichOneof("outcome") == "response" for r in served.values())
        outbox.put(_score_request(sequences[2], "later"))  # the same stream, after the hint
        later = next(responses)
        assert later.request_id == "later" and later.WhichOneof("outcome") == "response"
        assert len(later.response.results) == 1
        outbox.put(None)
        assert list(responses) == []


def test_other_score_stream_errors_carry_no_retry_hint(serve, sequences):
    server = serve()
    with grpc.insecure_channel(server.address) as channel:
        bad = pb.ScoreRequest(sequences=[pb.Sequence(token_ids=[1, 2], score_from=5)])
        (answer,) = pb_grpc.TeacherStub(channel).ScoreStream(iter([bad]), timeout=30)
    assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not answer.error.HasField("retry_after_s")


@pytest.mark.parametrize("flavour", ["blocking", "asyncio"])
def test_the_stream_clients_send_a_refused_request_again_after_its_hint_and_keep_the_order(
    serve, gated, sequences, client, flavour
):
    server = serve(limits=busy_limits(sequences[:3]))
    gated.gate.clear()
    calls = [{"sequences": [ids], "score_from": 1, "top_k": 2} for ids in sequences[:3]]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TeacherStub(channel)
        held = stub.Score.future(_score_request(sequences[0]), timeout=30)
        assert gated.entered.wait(10)
        queued = stub.Score.future(_score_request(sequences[1:3]), timeout=30)
        _until(lambda: server.running.engine.batcher.pending == 2)
        threading.Timer(0.5, gated.gate.set).start()  # the queue drains half a second from now
        if flavour == "blocking":
            with TeacherClient(server.address, timeout=30) as teacher:
                streamed = list(teacher.score_stream(calls, window=3))
        else:

            async def stream() -> list:
                async with AsyncTeacherClient(server.address, timeout=30) as teacher:
                    return [results async for results in teacher.score_stream(calls, window=3)]

            streamed = asyncio.run(stream())
        held.result(30), queued.result(30)
    assert server.running.engine.batcher.stats.refused >= 1  # it was refused, then served
    expected = [client.score(**call) for call in calls]  # the session's own server
    assert [[r.topk_ids.tolist() for r in results] for results in streamed] == [
        [r.topk_ids.tolist() for r in results] for results in expected
    ]


# --- Generate and the caller's deadline ------------------------------------------------------


@pytest.fixture
def chunked(serve) -> BackgroundServer:
    """One prompt per chunk: 4 tokens + MAX_NEW_TOKENS is 12, two rows would be 24 > 16."""
    return serve(http_port=0, limits=Limits(max_batch_tokens=16))


def _prompts(sequences) -> list[list[int]]:
    return [sequence[:4] for sequence in sequences[:4]]


def _generate_request(sequences) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompts=[pb.Prompt(token_ids=p) for p in _prompts(sequences)],
        max_new_tokens=MAX_NEW_TOKENS,
        ignore_eos=True,
    )


def _release_and_check_only_the_first_chunk_ran(server, gated) -> None:
    gated.gate.set()
    assert server.running.engine.worker.join(10)  # the chunk on the worker finished there
    assert gated.generate_calls == 1  # the 3 chunks after the deadline never reached it


def test_generate_stops_at_the_grpc_deadline_before_the_chunks_after_it(chunked, gated, sequences):
    gated.gate.clear()
    with grpc.insecure_channel(chunked.address) as channel:
        stub = pb_grpc.TeacherStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as expired:
            stub.Generate(_generate_request(sequences), timeout=0.5)
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5  # at the deadline, the gate still closed
        _until(lambda: _dropped(chunked, "expired") == 3)  # the 3 prompts never started
        _release_and_check_only_the_first_chunk_ran(chunked, gated)
        served = stub.Generate(_generate_request(sequences), timeout=30)  # no deadline left
    assert [len(c.token_ids) for c in served.completions] == [MAX_NEW_TOKENS] * 4
    assert gated.generate_calls == 5 and _dropped(chunked, "cancelled") == 0


def test_http_generate_answers_504_at_its_request_timeout_before_the_chunks_after_it(
    chunked, gated, sequences
):
    gated.gate.clear()
    body = {"prompts": [{"token_ids": p} for p in _prompts(sequences)]}
    body |= {"max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True}
    started = time.monotonic()
    expired = httpx.post(
        chunked.http_url + "/v1/generate", json=body, headers={"X-Request-Timeout": "0.5"}
    )
    assert 0.5 <= time.monotonic() - started < 5  # answered while the first chunk still runs
    assert expired.status_code == 504
    assert "deadline passed after 0 of 4 prompts" in expired.json()["error"]
    assert _dropped(chunked, "expired") == 3
    _release_and_check_only_the_first_chunk_ran(chunked, gated)
    again = httpx.post(chunked.http_url + "/v1/generate", json=body, timeout=30)
    assert again.status_code == 200 and len(again.json()["completions"]) == 4


def test_generate_whose_deadline_passed_on_arrival_runs_nothing(chunked, gated, sequences):
    body = {"prompts": [{"token_ids": p} for p in _prompts(sequences)], "max_new_tokens": 2}
    answer = httpx.post(
        chunked.http_url + "/v1/generate", json=body, headers={"X-Request-Timeout": "0"}
    )
    assert answer.status_code == 504 and gated.generate_calls == 0
    assert _dropped(chunked, "expired") == 4
