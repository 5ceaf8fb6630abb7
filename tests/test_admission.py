"""Admission by time and deadlines: a request beyond the queue's wait budget is refused at
once with a retry hint, the client comes back after the hint, and work whose caller has
gone (cancelled, deadline passed or sure to pass) never reaches a forward."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import httpx
import pytest

from teacher_client import TeacherClient
from teacher_client.proto import teacher_pb2 as pb
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_client.retry import RETRY_AFTER_KEY
from teacher_service.batcher import (
    RETRY_AFTER_BOUNDS,
    BatcherOverloaded,
    DeadlineExceeded,
    DynamicBatcher,
    ModelWorker,
)
from teacher_service.config import Limits
from teacher_service.metrics import ServiceMetrics
from tests.conftest import GatedBackend, start_background_server
from tests.test_batcher import SLOW, RecordingModel, _until

TOKENS_PER_SECOND = 1000.0  # the throughput the batcher tests pretend to have measured


def _run(coroutine_fn, *, max_queue_seconds: float = 0.4, max_batch_tokens: int = 10**6):
    async def main():
        model, worker, metrics = RecordingModel(), ModelWorker(), ServiceMetrics()
        batcher = DynamicBatcher(
            model,
            worker,
            length=abs,
            max_batch_tokens=max_batch_tokens,
            max_wait_ms=0,
            max_queue_seconds=max_queue_seconds,
            observer=metrics,
        )
        batcher.throughput.observe(int(TOKENS_PER_SECOND), 1.0)
        batcher.start()
        try:
            return model, batcher, metrics, await coroutine_fn(batcher, model)
        finally:
            model.gate.set()
            await batcher.close()
            worker.close()

    return asyncio.run(main())


def test_a_request_beyond_the_queues_wait_budget_is_refused_at_once_and_the_admitted_are_served():
    async def submit(batcher, model):
        slow = asyncio.create_task(batcher.submit([SLOW]))  # holds the worker
        await _until(lambda: model.batches == [[SLOW]])
        # at 1000 tokens/s, forwards of 100 tokens: the running one has <= 0.1 s left
        admitted = asyncio.create_task(batcher.submit([150]))  # an empty queue admits
        await _until(lambda: batcher.pending == 1)
        # 150 + 200 tokens, of which the forward it would join holds 100: <= 0.35 s
        also = asyncio.create_task(batcher.submit([200]))
        await _until(lambda: batcher.pending == 2)
        started = time.monotonic()
        with pytest.raises(BatcherOverloaded) as refused:  # > 0.41 s waits now
            await batcher.submit([160])
        assert time.monotonic() - started < 0.05  # at once, not after a wait
        with pytest.raises(BatcherOverloaded) as refused_next:  # > 0.46 s
            await batcher.submit([210])
        model.gate.set()
        return refused.value, refused_next.value, await admitted, await also, await slow

    model, batcher, _, (refusal, refusal_next, *served) = _run(
        submit, max_queue_seconds=0.4, max_batch_tokens=100
    )
    assert served == [[300], [400], [2 * SLOW]]
    # back when the queue's wait is within its budget again: 0.01 s + what is left of the
    # running forward (at least RETRY_AFTER_BOUNDS[0])
    assert RETRY_AFTER_BOUNDS[0] <= refusal.retry_after <= 0.11 + 0.01
    # the next refused request is booked after the first one's 160 tokens (0.16 s at 1000
    # tokens/s), not sent back into the same instant
    assert refusal_next.retry_after == pytest.approx(refusal.retry_after + 0.16, abs=0.015)
    assert "max_queue_seconds = 0.4" in str(refusal)
    assert [160] not in model.batches and [210] not in model.batches
    assert batcher.stats.refused == 2


def test_cancelled_and_expired_work_never_reaches_a_forward():
    async def submit(batcher, model):
        slow = asyncio.create_task(batcher.submit([SLOW]))  # holds the worker
        await _until(lambda: model.batches == [[SLOW]])
        loop = asyncio.get_running_loop()
        cancelled = asyncio.create_task(batcher.submit([5, 6]))
        expiring = asyncio.create_task(batcher.submit([7, 8], deadline=loop.time() + 0.1))
        # 300 tokens take 0.3 s at 1000 tokens/s: a 0.25 s deadline cannot be met
        hopeless = asyncio.create_task(batcher.submit([300], deadline=loop.time() + 0.25))
        await _until(lambda: batcher.pending == 5)
        cancelled.cancel()
        with pytest.raises(DeadlineExceeded):
            await expiring  # after 0.1 s, while the worker is still held
        assert batcher.pending == 1
        model.gate.set()
        with pytest.raises(DeadlineExceeded, match="would pass before its forward ended"):
            await hopeless
        with pytest.raises(DeadlineExceeded):  # already past: not even queued
            await batcher.submit([9], deadline=loop.time() - 1)
        await slow
        return await batcher.submit([1], deadline=loop.time() + 10)

    model, batcher, metrics, result = _run(submit, max_queue_seconds=100)
    assert result == [2]
    assert model.batches == [[SLOW], [1]]  # nothing of the others was computed
    assert (batcher.stats.cancelled, batcher.stats.expired, batcher.stats.wasted) == (2, 4, 0)
    rendered = metrics.render().decode()
    assert 'teacher_sequences_dropped_total{reason="cancelled"} 2.0' in rendered
    assert 'teacher_sequences_dropped_total{reason="expired"} 4.0' in rendered
    assert "teacher_sequences_computed_total 2.0" in rendered


@pytest.fixture(scope="module")
def gated(backend):
    return GatedBackend(backend)


@pytest.fixture(scope="module")
def busy_server(tiny_model_dir, gated, sequences):
    """A 1 ms wait budget and forwards of one token: once a forward has been measured, one
    queued request puts the queue over it (its 20-odd tokens cannot ride in the forward
    a new request would join, and take longer than 1 ms)."""
    limits = Limits(max_queue_seconds=0.001, max_forward_seconds=1e-9)
    running = start_background_server(
        tiny_model_dir, gated, limits=limits, http_port=0, max_wait_ms=0.0
    )
    with TeacherClient(running.address, timeout=30) as teacher:
        teacher.score(sequences[:1], 1, top_k=2)  # the throughput is measured
    yield running
    running.stop()


def _hold_the_worker_and_fill_the_queue(server, gated, sequences) -> list[threading.Thread]:
    """One call in a forward (held at the gate), one queued behind it; both succeed later."""
    gated.gate.clear()
    gated.entered.clear()
    results: list = []

    def call():
        with TeacherClient(server.address, timeout=30) as client:
            results.append(client.score(sequences[:1], 1, top_k=2))

    threads = [threading.Thread(target=call) for _ in range(2)]
    threads[0].start()
    assert gated.entered.wait(10)
    threads[1].start()
    deadline = time.monotonic() + 10
    while server.running.engine.batcher.pending == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return threads


def test_grpc_and_http_refusals_carry_a_retry_hint_in_each_dialects_shape(
    busy_server, gated, sequences
):
    threads = _hold_the_worker_and_fill_the_queue(busy_server, gated, sequences)
    try:
        request = pb.ScoreRequest(sequences=[pb.Sequence(token_ids=sequences[0], score_from=1)])
        with grpc.insecure_channel(busy_server.address) as channel:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.TeacherStub(channel).Score(request, timeout=30)
            assert time.monotonic() - started < 1.0
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue_seconds" in refused.value.details()
        hint = dict(refused.value.trailing_metadata())[RETRY_AFTER_KEY]
        assert RETRY_AFTER_BOUNDS[0] <= float(hint) <= RETRY_AFTER_BOUNDS[1]
        native = httpx.post(
            busy_server.http_url + "/v1/score",
            json={"sequences": [{"token_ids": sequences[0], "score_from": 1}]},
        )
        assert native.status_code == 429 and int(native.headers["retry-after"]) >= 1
        assert "max_queue_seconds" in native.json()["error"]
        openai = httpx.post(
            busy_server.http_url + "/v1/completions",
            json={"prompt": sequences[0], "max_tokens": 1, "prompt_logprobs": 1},
        )
        assert openai.status_code == 429 and "retry-after" in openai.headers
        assert openai.json()["error"]["type"] == "rate_limit_error"
    finally:
        gated.gate.set()
        for thread in threads:
            thread.join(30)
    metrics = httpx.get(busy_server.http_url + "/metrics").text
    assert 'status="RESOURCE_EXHAUSTED"' in metrics and 'status="429"' in metrics


def test_the_client_retries_after_the_hint_and_succeeds(busy_server, gated, sequences, client):
    threads = _hold_the_worker_and_fill_the_queue(busy_server, gated, sequences)
    refused_before = busy_server.running.engine.batcher.stats.refused
    threading.Timer(0.5, gated.gate.set).start()  # the queue drains half a second from now
    try:
        with TeacherClient(busy_server.address, timeout=30) as teacher:
            results = teacher.score(sequences[:2], 1, top_k=2)
    finally:
        gated.gate.set()
        for thread in threads:
            thread.join(30)
    assert busy_server.running.engine.batcher.stats.refused > refused_before  # it was refused
    expected = client.score(sequences[:2], 1, top_k=2)  # the session's own server
    assert [r.topk_ids.tolist() for r in results] == [r.topk_ids.tolist() for r in expected]


def test_forwards_hold_no_more_than_the_measured_throughput_runs_in_max_forward_seconds():
    """At 1000 tokens/s and max_forward_seconds 0.1, a forward holds <= 100 padded tokens,
    however much is queued; a longer sequence still runs, alone."""

    async def main():
        model, worker = RecordingModel(), ModelWorker()
        batcher = DynamicBatcher(
            model, worker, length=abs, max_batch_tokens=10**6, max_wait_ms=0,
            max_forward_seconds=0.1,
        )  # fmt: skip
        assert batcher.forward_budget() == 10**6  # nothing measured yet: the token budget
        batcher.throughput.observe(int(TOKENS_PER_SECOND), 1.0)
        batcher.throughput.observe = lambda *_: None  # held at 1000 tokens/s
        assert batcher.forward_budget() == 100
        batcher.start()
        try:
            slow = asyncio.create_task(batcher.submit([SLOW]))  # holds the worker
            await _until(lambda: model.batches == [[SLOW]])
            queued = asyncio.create_task(batcher.submit([40, 40, 40, 40, 40, 300]))
            await _until(lambda: batcher.pending == 6)
            model.gate.set()
            return model, await queued, await slow
        finally:
            model.gate.set()
            await batcher.close()
            worker.close()

    model, results, _ = asyncio.run(main())
    assert results == [80, 80, 80, 80, 80, 600]
    # 2 x 40 fit in 100 padded tokens, 3 x 40 do not; 300 runs alone, after the last 40
    assert model.batches[1:] == [[40, 40], [40, 40], [40], [300]]
