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
    FORWARD_REQUESTS,
    REQUEST_WEIGHT,
    RETRY_AFTER_BOUNDS,
    BatcherOverloaded,
    DeadlineExceeded,
    DynamicBatcher,
    ModelWorker,
)
from teacher_service.metrics import ServiceMetrics
from tests.conftest import GatedBackend, busy_limits, start_background_server
from tests.test_batcher import SLOW, RecordingModel, _hold_the_rate, _until


def _run(coroutine_fn, *, max_queue_forwards: float = 4, max_batch_tokens: int = 10**6):
    async def main():
        model, worker, metrics = RecordingModel(), ModelWorker(), ServiceMetrics()
        batcher = DynamicBatcher(
            model,
            worker,
            length=abs,
            max_batch_tokens=max_batch_tokens,
            max_wait_ms=0,
            max_queue_forwards=max_queue_forwards,
            observer=metrics,
        )
        _hold_the_rate(batcher)
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
        # at 1000 tokens/s, forwards of 100 tokens (0.1 s): the budget is 3 forwards, 0.3 s
        assert batcher.forward_budget() == 100 and batcher.queue_budget() == pytest.approx(0.3)
        admitted = asyncio.create_task(batcher.submit([150]))  # an empty queue admits
        await _until(lambda: batcher.pending == 1)
        # 150 queued: one full forward runs before it (0.1 s), after the running one's rest
        also = asyncio.create_task(batcher.submit([100]))
        await _until(lambda: batcher.pending == 2)
        third = asyncio.create_task(batcher.submit([120]))  # 250 queued: two, 0.2 s + the rest
        await _until(lambda: batcher.pending == 3)
        with pytest.raises(BatcherOverloaded) as refused:  # 370 queued: three, 0.3 s + the rest
            await batcher.submit([210])
        assert model.batches == [[SLOW]]  # at once: the first forward still holds the worker
        with pytest.raises(BatcherOverloaded) as refused_next:
            await batcher.submit([50])
        model.gate.set()
        served = [await admitted, await also, await third, await slow]
        return refused.value, refused_next.value, served

    model, batcher, _, (refusal, refusal_next, served) = _run(
        submit, max_queue_forwards=3, max_batch_tokens=100
    )
    assert served == [[300], [200], [240], [2 * SLOW]]
    # back when the queue's wait is within its budget again: once the running forward's rest
    # has run (at least RETRY_AFTER_BOUNDS[0])
    assert RETRY_AFTER_BOUNDS[0] <= refusal.retry_after <= 0.1 + 0.01
    # the next refused request is booked after the first one's 210 tokens (0.21 s at 1000
    # tokens/s), not sent back into the same instant
    assert refusal_next.retry_after == pytest.approx(refusal.retry_after + 0.21, abs=0.015)
    assert "max_queue_forwards = 3 forwards of 100 tokens" in str(refusal)
    assert [210] not in model.batches and [50] not in model.batches
    assert batcher.stats.refused == 2


def test_a_request_is_never_refused_against_its_own_sequences():
    """Its own tokens are not ahead of it: a request of 50 forwards is admitted behind a
    short queue, and one arriving at an empty queue is admitted whatever its size."""

    async def submit(batcher, model):
        slow = asyncio.create_task(batcher.submit([SLOW]))
        await _until(lambda: model.batches == [[SLOW]])
        big = asyncio.create_task(batcher.submit([60] * 50))  # empty queue: admitted
        await _until(lambda: batcher.pending == 50)
        with pytest.raises(BatcherOverloaded):  # 30 full forwards ahead of it
            await batcher.submit([60])
        model.gate.set()
        await big, await slow
        model.gate.clear()
        queued = asyncio.create_task(batcher.submit([SLOW]))  # holds the worker again
        await _until(lambda: len(model.batches) == 52)
        followers = asyncio.create_task(batcher.submit([30]))
        await _until(lambda: batcher.pending == 1)
        huge = asyncio.create_task(batcher.submit([60] * 50))  # 30 ahead, within a forward
        await _until(lambda: batcher.pending == 51)
        model.gate.set()
        return await queued, await followers, await huge

    _, batcher, _, (queued, followers, huge) = _run(
        submit, max_queue_forwards=2, max_batch_tokens=100
    )
    assert queued == [2 * SLOW] and followers == [60] and huge == [120] * 50
    assert batcher.stats.refused == 1


def test_nothing_is_refused_before_a_forward_has_been_measured():
    """A remote backend's first calls: no estimate is better than a wrong one (the hard
    cap, max_queued_tokens, still holds)."""

    async def main():
        model, worker = RecordingModel(), ModelWorker()
        batcher = DynamicBatcher(
            model, worker, length=abs, max_batch_tokens=10, max_wait_ms=0,
            max_queued_tokens=1000, max_queue_forwards=1,
        )  # fmt: skip
        assert batcher.queue_budget() is None and batcher.estimated_wait() == 0.0
        assert batcher.forward_budget() == 10
        batcher.start()
        try:
            slow = asyncio.create_task(batcher.submit([SLOW]))
            await _until(lambda: model.batches == [[SLOW]])
            queued = [asyncio.create_task(batcher.submit([9] * 10)) for _ in range(5)]
            await _until(lambda: batcher.pending == 50)
            with pytest.raises(BatcherOverloaded, match="max_queued_tokens = 1000"):
                await batcher.submit([9] * 70)  # 450 + 630 tokens
            model.gate.set()
            return await asyncio.gather(*queued), await slow
        finally:
            model.gate.set()
            await batcher.close()
            worker.close()

    results, _ = asyncio.run(main())
    assert results == [[18] * 10] * 5


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

    model, batcher, metrics, result = _run(submit, max_queue_forwards=1000)
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
    """Forwards of one sequence and a queue that admits nothing past the next forward."""
    running = start_background_server(
        tiny_model_dir, gated, limits=busy_limits(sequences), http_port=0, max_wait_ms=0.0
    )
    yield running
    running.stop()


def _hold_the_worker_and_fill_the_queue(server, gated, sequences) -> list[threading.Thread]:
    """One call in a forward (held at the gate), one of every sequence queued behind it
    (more than the next forward holds); both succeed later."""
    gated.gate.clear()
    gated.entered.clear()
    results: list = []

    def call(batch):
        with TeacherClient(server.address, timeout=30) as client:
            results.append(client.score(batch, 1, top_k=2))

    threads = [threading.Thread(target=call, args=(batch,)) for batch in (sequences[:1], sequences)]
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
        assert "max_queue_forwards" in refused.value.details()
        hint = dict(refused.value.trailing_metadata())[RETRY_AFTER_KEY]
        assert RETRY_AFTER_BOUNDS[0] <= float(hint) <= RETRY_AFTER_BOUNDS[1]
        native = httpx.post(
            busy_server.http_url + "/v1/score",
            json={"sequences": [{"token_ids": sequences[0], "score_from": 1}]},
        )
        assert native.status_code == 429 and int(native.headers["retry-after"]) >= 1
        assert "max_queue_forwards" in native.json()["error"]
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


def test_metrics_show_the_budgets_admission_compares_the_wait_with(busy_server):
    batcher = busy_server.running.engine.batcher
    registry = busy_server.running.engine.metrics.registry
    assert registry.get_sample_value("teacher_forward_budget_tokens") == batcher.forward_budget()
    assert registry.get_sample_value("teacher_queue_wait_budget_seconds") == pytest.approx(
        batcher.queue_budget()
    )
    assert registry.get_sample_value("teacher_queue_wait_estimate_seconds") == 0.0  # idle


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


def test_a_forward_holds_the_efficient_batch_or_four_mean_requests_and_a_long_sequence_alone():
    """Forwards are sized by measurement: at least the smallest size within 90 % of the
    best measured rate, and room for FORWARD_REQUESTS requests of the recent mean size;
    at most max_batch_tokens; a sequence longer than that still runs, alone."""

    async def main():
        model, worker = RecordingModel(), ModelWorker()
        batcher = DynamicBatcher(model, worker, length=abs, max_batch_tokens=1000, max_wait_ms=0)
        assert batcher.forward_budget() == 1000  # nothing measured yet: the token budget
        # 64 tokens: 500/s, 128: 950/s, 256: 1000/s, 512: 800/s -> efficient from 128
        for tokens, rate in ((64, 500), (128, 950), (256, 1000), (512, 800)):
            batcher.capacity.observe(tokens, tokens / rate)
        batcher.capacity.observe = lambda *_: None
        assert batcher.capacity.efficient_tokens() == 128
        assert batcher.forward_budget() == 128
        batcher.start()
        try:
            slow = asyncio.create_task(batcher.submit([SLOW]))  # holds the worker
            await _until(lambda: model.batches == [[SLOW]])
            # requests of 100 tokens, then 6 x 20: their mean is 102, so forwards hold 408
            queued = asyncio.create_task(batcher.submit([20] * 6))
            await _until(lambda: batcher.pending == 6)
            assert batcher.forward_budget() == int(FORWARD_REQUESTS * (100 + REQUEST_WEIGHT * 20))
            longer = asyncio.create_task(batcher.submit([1500]))  # more than max_batch_tokens
            await _until(lambda: batcher.pending == 7)
            model.gate.set()
            return model, await queued, await longer, await slow
        finally:
            model.gate.set()
            await batcher.close()
            worker.close()

    model, results, longer, _ = asyncio.run(main())
    assert results == [40] * 6 and longer == [3000]
    # the six 20s in one forward; 1500 over the 1000 tokens of max_batch_tokens, alone
    assert model.batches[1:] == [[20] * 6, [1500]]


def test_a_caller_back_before_its_hint_is_held_until_then_and_one_with_a_deadline_is_not():
    """A caller that ignores retry-after and retries at once is held until the return its
    refusal booked, then admitted like any other; a caller with a deadline before that
    return is refused at once with what is left of its hint; other callers are not held."""

    async def submit(batcher, model):
        loop = asyncio.get_running_loop()
        slow = asyncio.create_task(
            batcher.submit([SLOW], caller=("a", "request"))
        )  # holds the worker
        await _until(lambda: model.batches == [[SLOW]])
        queued = asyncio.create_task(batcher.submit([100] * 4, caller=("b", "request")))
        await _until(lambda: batcher.pending == 4)
        with pytest.raises(BatcherOverloaded) as refused:  # 4 forwards ahead: over 2
            await batcher.submit([10], caller=("c", "request"))
        hint = refused.value.retry_after
        with pytest.raises(BatcherOverloaded) as hurried:  # back at once, a deadline first
            await batcher.submit([10], caller=("c", "request"), deadline=loop.time() + hint / 2)
        assert 0 < hurried.value.retry_after <= hint
        assert batcher.stats.held == 0
        started = loop.time()
        again = asyncio.create_task(
            batcher.submit([10], caller=("c", "request"))
        )  # back at once: held
        await _until(lambda: batcher.stats.held == 1)
        with pytest.raises(BatcherOverloaded):  # another caller: refused, not held
            await batcher.submit([10], caller=("d", "request"))
        model.gate.set()
        result = await again
        return result, loop.time() - started, hint, await queued, await slow

    _, batcher, metrics, (result, waited, hint, queued, _) = _run(
        submit, max_queue_forwards=2, max_batch_tokens=100
    )
    assert result == [20] and queued == [200] * 4
    assert waited >= hint * 0.99  # it was answered no earlier than it was told to come back
    assert batcher.stats.held == 1 and batcher.stats.refused == 3
    assert "teacher_requests_held_total 1.0" in metrics.render().decode()


@pytest.mark.parametrize("back", ["resend", "new-request"])
def test_refused_callers_keep_their_turn_ahead_of_callers_who_arrive_after_them(back):
    """A refused request's room is reserved until its turn: a newcomer that finds the queue
    short, but not short of what is booked to come back, is refused too. The caller refused
    first gets its turn back, whether it resends its request (early: held until the turn)
    or sends another from the same connection once its turn has come."""

    async def submit(batcher, model):
        loop = asyncio.get_running_loop()
        slow = asyncio.create_task(batcher.submit([SLOW], caller=("a", "x")))  # holds the worker
        await _until(lambda: model.batches == [[SLOW]])
        queued = asyncio.create_task(batcher.submit([100] * 3, caller=("b", "x")))
        await _until(lambda: batcher.pending == 3)
        turns = []
        for peer in ("c", "e"):  # 3 full forwards ahead: refused, booked one after another
            with pytest.raises(BatcherOverloaded) as refused:
                await batcher.submit([100], caller=(peer, "x"))
            turns.append(loop.time() + refused.value.retry_after)
        model.gate.set()  # everything runs; the bookings stand
        await slow, await queued
        model.gate.clear()
        held = asyncio.create_task(batcher.submit([SLOW], caller=("f", "x")))  # empty: admitted
        await _until(lambda: len(model.batches) == 5)
        small = asyncio.create_task(batcher.submit([150], caller=("g", "x")))  # empty: admitted
        await _until(lambda: batcher.pending == 1)
        # 150 queued and 200 booked to come back: three full forwards ahead, over the
        # budget of two; with nothing booked it would have been one
        with pytest.raises(BatcherOverloaded):
            await batcher.submit([10], caller=("h", "x"))
        if back == "resend":  # at once: held until its turn
            first = asyncio.create_task(batcher.submit([100], caller=("c", "x")))
            await _until(lambda: batcher.stats.held == 1)
        else:  # its turn has come: the connection's, whatever it sends
            await asyncio.sleep(turns[0] - loop.time())
            first = asyncio.create_task(batcher.submit([100], caller=("c", "y")))
        await _until(lambda: batcher.pending == 2)  # admitted: one forward ahead, e's after
        model.gate.set()
        return await first, await small, await held

    _, batcher, _, (first, small, held) = _run(submit, max_queue_forwards=2, max_batch_tokens=100)
    assert first == [200] and small == [300] and held == [2 * SLOW]
    assert batcher.stats.refused == 3
