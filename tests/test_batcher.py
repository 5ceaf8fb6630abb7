"""The dynamic batcher's policy, with a recording fake model in place of a forward pass."""

from __future__ import annotations

import asyncio
import random

import pytest

from teacher_service.batcher import DynamicBatcher, ModelWorker


class RecordingModel:
    """'Scores' an item by doubling it and records every batch; fails on items < 0."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if any(item < 0 for item in items):
            raise RuntimeError("negative item")
        return [2 * item for item in items]


def _run(coroutine_fn, *, budget=64, wait_ms=20.0):
    async def main():
        model, worker = RecordingModel(), ModelWorker()
        batcher = DynamicBatcher(
            model, worker, length=abs, max_batch_tokens=budget, max_wait_ms=wait_ms
        )
        batcher.start()
        try:
            return model, batcher, await coroutine_fn(batcher)
        finally:
            await batcher.close()
            worker.close()

    return asyncio.run(main())


def test_concurrent_requests_are_merged_within_the_budget_and_routed_back():
    rng = random.Random(0)
    requests = [[rng.randint(1, 30) for _ in range(rng.randint(1, 4))] for _ in range(20)]

    async def submit_all(batcher):
        return await asyncio.gather(*(batcher.submit(r) for r in requests))

    model, batcher, results = _run(submit_all)
    assert results == [[2 * x for x in r] for r in requests]
    assert sorted(x for b in model.batches for x in b) == sorted(x for r in requests for x in r)
    assert all(max(b) * len(b) <= 64 for b in model.batches)  # padded tokens within budget
    assert len(model.batches) < sum(map(len, requests))  # sequences were merged
    assert batcher.stats.padded_tokens == sum(max(b) * len(b) for b in model.batches)


def test_batches_group_similar_lengths_around_the_oldest():
    async def submit(batcher):
        return await asyncio.gather(batcher.submit([10]), batcher.submit([30, 11, 29, 9, 31]))

    model, _, _ = _run(submit, budget=96)
    assert model.batches[0][0] == 10  # the oldest goes first
    assert sorted(model.batches[0]) == [9, 10, 11]  # with its nearest lengths (3 x 11 <= 96)
    assert sorted(model.batches[1]) == [29, 30, 31]


def test_a_failing_sequence_fails_alone():
    async def submit(batcher):
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


def test_cancelled_requests_leave_the_queue():
    async def submit(batcher):
        task = asyncio.create_task(batcher.submit([5, 6, 7]))
        await asyncio.sleep(0.05)  # queued: the batcher waits up to 1 s for company
        assert batcher.pending == 3
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert batcher.pending == 0
        return await batcher.submit([1])

    model, batcher, result = _run(submit, wait_ms=1000.0, budget=10**6)
    assert result == [2]
    assert model.batches == [[1]]
    assert batcher.stats.cancelled == 3


def test_a_full_budget_does_not_wait_for_the_deadline():
    async def submit(batcher):
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await batcher.submit([32, 32])  # fills the 64-token budget at once
        return result, loop.time() - start

    _, _, (result, elapsed) = _run(submit, wait_ms=5000.0)
    assert result == [64, 64]
    assert elapsed < 4.0  # far below the 5 s wait bound
