"""The dynamic batcher's policy, with a recording fake model in place of a forward pass."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import sys
import threading
import time

import pytest

from teacher_service.batcher import BatcherClosed, DynamicBatcher, ModelWorker

SLOW = 100  # an item that holds the worker until the test opens the gate
TOKENS_PER_SECOND = 1000.0  # the rate the batcher tests pretend to have measured, every size


class RecordingModel:
    """'Scores' an item by doubling it and records every batch; fails on items < 0."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if SLOW in items:
            self.gate.wait(timeout=30)
        if any(item < 0 for item in items):
            raise RuntimeError("negative item")
        return [2 * item for item in items]


def _hold_the_rate(batcher: DynamicBatcher) -> None:
    """The batcher measures TOKENS_PER_SECOND at every forward size (its efficient batch:
    512 tokens), and nothing else: the fake model's own speed does not size forwards."""
    batcher.capacity.observe(int(TOKENS_PER_SECOND), 1.0)
    batcher.capacity.observe = lambda *_: None


def _run(coroutine_fn, *, budget=64, wait_ms=20.0):
    async def main():
        model, worker = RecordingModel(), ModelWorker()
        batcher = DynamicBatcher(
            model, worker, length=abs, max_batch_tokens=budget, max_wait_ms=wait_ms
        )
        _hold_the_rate(batcher)
        batcher.start()
        try:
            return model, batcher, await coroutine_fn(batcher, model, worker)
        finally:
            await batcher.close()
            worker.close()

    return asyncio.run(main())


def test_concurrent_requests_are_merged_within_the_budget_and_routed_back():
    rng = random.Random(0)
    requests = [[rng.randint(1, 30) for _ in range(rng.randint(1, 4))] for _ in range(20)]

    async def submit_all(batcher, *_):
        return await asyncio.gather(*(batcher.submit(r) for r in requests))

    model, batcher, results = _run(submit_all)
    assert results == [[2 * x for x in r] for r in requests]
    assert sorted(x for b in model.batches for x in b) == sorted(x for r in requests for x in r)
    assert all(max(b) * len(b) <= 64 for b in model.batches)  # padded tokens within budget
    assert len(model.batches) < sum(map(len, requests))  # sequences were merged
    assert batcher.stats.padded_tokens == sum(max(b) * len(b) for b in model.batches)


def test_batches_group_similar_lengths_around_the_oldest():
    async def submit(batcher, *_):
        return await asyncio.gather(batcher.submit([10]), batcher.submit([30, 11, 29, 9, 31]))

    model, _, _ = _run(submit, budget=96)
    assert model.batches[0][0] == 10  # the oldest goes first
    assert sorted(model.batches[0]) == [9, 10, 11]  # with its nearest lengths (3 x 11 <= 96)
    assert sorted(model.batches[1]) == [29, 30, 31]


def test_a_failing_sequence_fails_alone():
    async def submit(batcher, *_):
        return await asyncio.gather(
            batcher.submit([1, 2]),
            batcher.submit([-3]),
            batcher.submit([4, 5]),
            return_exceptions=True,
        )

    model, _, results = _run(submit)
    assert results[0] == [2, 4] and results[2] == [8, 10]
    assert isinstance(results[1], RuntimeError)
    assert [-3] in model.batches  # isolated by splitting the failing batch


async def _until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_cancelled_requests_leave_the_queue():
    async def submit(batcher, model, _):
        slow = asyncio.create_task(batcher.submit([SLOW]))  # holds the worker
        await _until(lambda: model.batches == [[SLOW]])
        waiting = asyncio.create_task(batcher.submit([5, 6, 7]))
        await _until(lambda: batcher.pending == 3)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert batcher.pending == 0
        model.gate.set()
        return await slow, await batcher.submit([1])

    model, batcher, result = _run(submit)
    assert result == ([2 * SLOW], [2])
    assert model.batches == [[SLOW], [1]]  # 5, 6, 7 never ran
    assert batcher.stats.cancelled == 3 and batcher.stats.sequences == 2


def test_a_caller_cancelled_as_its_deadline_passes_leaves_no_error_for_asyncio_to_log():
    """gRPC cancels a handler at its deadline, when the batcher's own timeout fires too: if
    the cancel lands while the timeout is cancelling the request's sequences, asyncio used
    to log "_GatheringFuture exception was never retrieved" at ERROR (a cancel storm wrote
    dozens). Here the cancel lands in that instant: when a sequence is cancelled."""
    logged: list[dict] = []

    async def submit(batcher, model, _):
        asyncio.get_running_loop().set_exception_handler(lambda _, context: logged.append(context))
        slow = asyncio.create_task(batcher.submit([SLOW]))  # holds the worker
        await _until(lambda: model.batches == [[SLOW]])
        expiring = [asyncio.create_task(batcher.submit([7], deadline=time.monotonic() + 0.05))]
        await _until(lambda: batcher.pending == 1)
        batcher._queue[0].future.add_done_callback(lambda _: expiring[0].cancel())
        with pytest.raises(asyncio.CancelledError):
            await expiring[0]
        expiring.clear()  # the task, its error and what that refers to can be collected
        model.gate.set()
        await slow
        gc.collect()  # asyncio logs an unretrieved exception when its future is collected

    _run(submit)
    assert [context["message"] for context in logged] == []


def test_a_batch_whose_caller_left_before_it_started_is_skipped():
    async def submit(batcher, model, worker):
        blocker = asyncio.create_task(worker.run(model.gate.wait, 30))  # e.g. a Generate call
        waiting = asyncio.create_task(batcher.submit([5]))
        await asyncio.sleep(0.05)  # the batch is formed and sits behind the blocker
        assert batcher.pending == 0
        waiting.cancel()
        model.gate.set()
        await blocker
        return await batcher.submit([1])

    model, batcher, result = _run(submit)
    assert result == [2]
    assert model.batches == [[1]]
    assert batcher.stats.sequences == 1


def test_a_closed_batcher_fails_running_queued_and_later_requests_at_once():
    async def submit(batcher, model, _):
        slow = asyncio.create_task(batcher.submit([SLOW]))  # holds the worker
        await _until(lambda: model.batches == [[SLOW]])
        queued = asyncio.create_task(batcher.submit([5]))
        await _until(lambda: batcher.pending == 1)
        await batcher.close()
        model.gate.set()
        with pytest.raises(BatcherClosed):  # its forward ends on the worker, for nobody
            await asyncio.wait_for(slow, timeout=5)
        with pytest.raises(BatcherClosed):
            await queued
        with pytest.raises(BatcherClosed):
            await asyncio.wait_for(batcher.submit([1]), timeout=5)

    model, _, _ = _run(submit)
    assert model.batches == [[SLOW]]  # nothing ran after the close


def test_a_lone_caller_does_not_wait_for_company():
    async def submit(batcher, *_):
        loop = asyncio.get_running_loop()
        started = loop.time()
        for n in range(5):
            assert await batcher.submit([n + 1]) == [2 * (n + 1)]
        return loop.time() - started

    _, _, elapsed = _run(submit, wait_ms=5000.0)
    assert elapsed < 5.0  # five requests, far less than one 5 s wait bound


def test_concurrent_callers_are_gathered_into_one_batch():
    """8 callers resubmitting at jittered times: batches hold all 8, not what arrived first."""

    async def caller(batcher, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(12):
            await asyncio.sleep(rng.uniform(0, 0.004))
            await batcher.submit([8])

    async def submit(batcher, *_):
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*(caller(batcher, n) for n in range(8)))
        return loop.time() - started

    model, _, elapsed = _run(submit, wait_ms=500.0, budget=10**6)
    sizes = [len(b) for b in model.batches]
    assert sum(sizes) == 96
    # until 8 were in flight at once the batcher knows fewer callers (how soon depends on
    # the scheduler: 2-8 forwards here, more on loaded cores); from then on each forward
    # waits for all 8, until the callers that started in the first forwards finish
    assert 8 in sizes, sizes
    first, last = sizes.index(8), len(sizes) - 1 - sizes[::-1].index(8)
    assert sizes[first : last + 1] == [8] * (last + 1 - first) and last - first >= 3, sizes
    # and no longer: only callers leaving at the end leave the others waiting the 0.5 s bound
    # out (a round or two); a batcher waiting out the bound every round would take 6 s
    assert elapsed < 4.0


def test_the_worker_runs_the_next_batch_while_a_caller_still_encodes_its_results():
    """Results are handed back on the event loop, and the model thread has already been given
    the next queued batch: it runs while a caller turns its results into a response (here a
    blocking 0.3 s 'encoding' on the loop). The queued batch fills the forward's budget, so
    it waits for no caller expected back (COMPANY_WAIT_FRACTION)."""
    started: dict[int, float] = {}
    recorded = RecordingModel()

    def model(items: list[int]) -> list[int]:
        started.setdefault(items[0], time.monotonic())
        return recorded(items)

    async def main():
        worker = ModelWorker()
        batcher = DynamicBatcher(model, worker, length=abs, max_batch_tokens=3, max_wait_ms=0)
        batcher.start()

        async def first():
            result = await batcher.submit([SLOW])
            time.sleep(0.3)  # encoding, on the event loop: nothing else runs on the loop now
            return result, time.monotonic()

        async def second():
            while not recorded.batches:  # queued while the first batch holds the worker
                await asyncio.sleep(0.001)
            task = asyncio.ensure_future(batcher.submit([3]))
            await asyncio.sleep(0.05)
            recorded.gate.set()
            return await task

        try:
            return await asyncio.gather(first(), second())
        finally:
            await batcher.close()
            worker.close()

    (first_result, encoded_at), second_result = asyncio.run(main())
    assert first_result == [2 * SLOW] and second_result == [6]
    assert started[3] < encoded_at - 0.2  # the second batch ran during the first's encoding


@pytest.mark.skipif(sys.platform != "linux", reason="nice is per thread on Linux only")
def test_the_model_worker_and_the_threads_it_starts_run_nice_steps_below_the_caller():
    """What the front door gains its preemption from: the kernel's own view of the worker
    thread's nice value, and of a thread the forward starts (as torch's OpenMP pool is)."""

    def nice_of_this_thread() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def nice_of_worker_and_child() -> tuple[int, int]:
        seen: list[int] = []
        child = threading.Thread(target=lambda: seen.append(nice_of_this_thread()))
        child.start()
        child.join()
        return nice_of_this_thread(), seen[0]

    async def main(nice: int) -> tuple[int, int]:
        worker = ModelWorker(nice=nice)
        try:
            return await worker.run(nice_of_worker_and_child)
        finally:
            worker.close()

    base = nice_of_this_thread()
    assert asyncio.run(main(7)) == (min(19, base + 7),) * 2
    assert asyncio.run(main(0)) == (base, base)
    assert nice_of_this_thread() == base  # the caller's own priority is untouched


def test_callers_just_answered_are_waited_for_so_that_a_split_group_merges():
    """Four callers, the first alone in a forward (it came first): the other three queue
    behind it. Without waiting they would alternate for ever, one and three per forward.
    The next forward waits for the caller it just answered (up to COMPANY_WAIT_FRACTION of
    a forward), so from then on the four share each forward; a caller that does not come
    back holds the others up no longer than that."""

    async def submit(batcher, model, _):
        async def caller(first: int, rounds: int) -> None:
            await batcher.submit([first])
            for _ in range(rounds - 1):
                await batcher.submit([10])

        alone = asyncio.create_task(caller(SLOW, 2))  # holds the worker in its first forward
        await _until(lambda: model.batches == [[SLOW]])
        others = [asyncio.create_task(caller(10, 2)) for _ in range(3)]
        await _until(lambda: batcher.pending == 3)
        model.gate.set()
        await asyncio.gather(alone, *others)

    model, _, _ = _run(submit, budget=512, wait_ms=0.0)
    # 1000 tokens/s and forwards of up to 512 tokens: it waits up to 51 ms for the caller
    assert model.batches == [[SLOW], [10, 10, 10, 10], [10, 10, 10]]
