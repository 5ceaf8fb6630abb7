"""Dynamic batching: sequences from many requests and clients merged into forward passes.

When to run: as soon as the queue fills the token budget, or holds a request from every
caller seen recently (the peak number of requests in flight over the last second), or
its oldest sequence has waited `max_wait_ms`. So a lone client never waits for company
that is not coming, and 8 clients are gathered into one forward instead of being split
by the jitter of their arrivals.

What to run: at most `max_batch_tokens` padded tokens (rows x longest), formed around the
oldest waiting sequence (so nothing starves) from the sequences closest to it in length
(so little padding is computed). The forward runs on the model worker thread, never on
the event loop. A request whose caller goes away (cancel, deadline) takes its queued
sequences out of the queue with it, and is skipped if its batch has not started yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from teacher_service.errors import ErrorKind, ServiceError

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Result = TypeVar("Result")
PEAK_WINDOW_SECONDS = 1.0  # how long a burst of concurrent callers is remembered


class ModelWorker:
    """The one thread that runs model code, so forwards never overlap or block the loop."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-worker")

    async def run(self, fn: Callable[..., Result], *args: Any) -> Result:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class BatcherStats:
    batches: int = 0
    sequences: int = 0
    real_tokens: int = 0  # tokens the sequences hold
    padded_tokens: int = 0  # rows x longest, summed over batches: what the forwards computed
    cancelled: int = 0  # sequences dropped from the queue because their caller left


@dataclass
class _Pending(Generic[Item]):
    item: Item
    length: int
    enqueued_at: float
    caller: int  # which submit() call it came from
    future: asyncio.Future = field(repr=False)


class BatcherClosed(ServiceError):
    """The batcher shut down before this sequence was run."""

    kind = ErrorKind.SHUTTING_DOWN


class BatcherOverloaded(ServiceError):
    """The queue already holds max_queued_tokens: come back later (HTTP 429)."""

    kind = ErrorKind.OVERLOADED


class BatchObserver(Protocol):
    """Told about every forward pass (metrics.ServiceMetrics implements it)."""

    def observe_batch(
        self, sizes: list[int], queue_waits: list[float], forward_seconds: float
    ) -> None: ...


class DynamicBatcher(Generic[Item, Result]):
    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        worker: ModelWorker,
        *,
        length: Callable[[Item], int],
        max_batch_tokens: int,
        max_wait_ms: float,
        max_queued_tokens: int | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._worker = worker
        self._length = length
        self._budget = max_batch_tokens
        self._max_wait = max_wait_ms / 1000.0
        self._max_queued = max_queued_tokens
        self._observer = observer
        self._queue: list[_Pending[Item]] = []
        self._callers = itertools.count()
        self._in_flight = 0  # submit() calls not yet answered
        self._recent_in_flight: deque[tuple[float, int]] = deque()  # (time, in flight) samples
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self.stats = BatcherStats()

    @property
    def pending(self) -> int:
        """Sequences queued and not yet in a forward pass."""
        return len(self._queue)

    @property
    def queued_tokens(self) -> int:
        return sum(p.length for p in self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="dynamic-batcher")

    async def close(self) -> None:
        """Fail what is queued, and from now on every submit(), with BatcherClosed."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(BatcherClosed("the service is shutting down"))
        self._queue.clear()

    async def submit(self, items: Sequence[Item]) -> list[Result]:
        """Queue items; return their results in order. Raises what running an item raised."""
        if self._closed:  # nothing would ever run it
            raise BatcherClosed("the service is shutting down")
        loop = asyncio.get_running_loop()
        now, caller = loop.time(), next(self._callers)
        lengths = [self._length(item) for item in items]
        if self._max_queued is not None and self.queued_tokens + sum(lengths) > self._max_queued:
            raise BatcherOverloaded(
                f"the teacher's queue is full ({self.queued_tokens} tokens waiting, "
                f"max_queued_tokens = {self._max_queued}): retry later"
            )
        futures = [loop.create_future() for _ in items]
        for item, length, future in zip(items, lengths, futures):
            self._queue.append(_Pending(item, length, now, caller, future))
        self._in_flight += 1
        self._recent_in_flight.append((now, self._in_flight))
        self._arrived.set()
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for future in futures:
                future.cancel()
            self._drop_cancelled()
            raise
        finally:
            self._in_flight -= 1

    def _expected_callers(self, now: float) -> int:
        """The most requests that were in flight at once during the last PEAK_WINDOW_SECONDS."""
        recent = self._recent_in_flight
        while len(recent) > 1 and now - recent[0][0] > PEAK_WINDOW_SECONDS:
            recent.popleft()
        return max(count for _, count in recent)

    def _ready(self, now: float) -> bool:
        """Run now: the oldest waited enough, the budget is full, or every recent caller is in."""
        if now - self._queue[0].enqueued_at >= self._max_wait:
            return True
        if self.queued_tokens >= self._budget:
            return True
        return len({p.caller for p in self._queue}) >= self._expected_callers(now)

    def _drop_cancelled(self) -> None:
        kept = [p for p in self._queue if not p.future.done()]
        self.stats.cancelled += len(self._queue) - len(kept)
        self._queue = kept

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            self._drop_cancelled()
            while self._queue and not self._ready(loop.time()):
                remaining = self._queue[0].enqueued_at + self._max_wait - loop.time()
                with contextlib.suppress(TimeoutError):  # then the oldest has waited enough
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                self._arrived.clear()
                self._drop_cancelled()
            if not self._queue:
                continue
            batch = self._take_batch()
            started = loop.time()
            outcomes = await self._worker.run(self._run_live, batch)
            ran = [p for p, outcome in zip(batch, outcomes) if outcome is not None]
            self._count(ran)
            if ran and self._observer is not None:
                self._observer.observe_batch(
                    [p.length for p in ran],
                    [started - p.enqueued_at for p in ran],
                    loop.time() - started,
                )
            for pending, outcome in zip(batch, outcomes):
                if pending.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)
            if self._queue:
                self._arrived.set()

    def _take_batch(self) -> list[_Pending[Item]]:
        """The oldest sequence plus those nearest it in length, within the token budget."""
        oldest = self._queue[0]
        nearest = sorted(
            self._queue[1:], key=lambda p: (abs(p.length - oldest.length), p.enqueued_at)
        )
        batch, longest = [oldest], oldest.length
        for pending in nearest:
            wider = max(longest, pending.length)
            if wider * (len(batch) + 1) <= self._budget:
                batch.append(pending)
                longest = wider
        taken = {id(p) for p in batch}
        self._queue = [p for p in self._queue if id(p) not in taken]
        return batch

    def _count(self, ran: list[_Pending[Item]]) -> None:
        if ran:
            self.stats.batches += 1
            self.stats.sequences += len(ran)
            self.stats.real_tokens += sum(p.length for p in ran)
            self.stats.padded_tokens += max(p.length for p in ran) * len(ran)

    def _run_live(self, batch: list[_Pending[Item]]) -> list[Result | BaseException | None]:
        """On the worker: run the batch's items whose callers are still waiting (None: skipped)."""
        live = [n for n, p in enumerate(batch) if not p.future.done()]
        outcomes: list[Result | BaseException | None] = [None] * len(batch)
        if live:
            for n, outcome in zip(live, self._run_isolated([batch[n].item for n in live])):
                outcomes[n] = outcome
        return outcomes

    def _run_isolated(self, items: list[Item]) -> list[Result | BaseException]:
        """Run a batch; if it fails, split it so only the failing sequence gets the error."""
        try:
            results = list(self._run_batch(items))
        except Exception as error:  # a forward can fail on one bad or huge input (OOM)
            if len(items) == 1:
                # e.g. a remote upstream's refusal
                if isinstance(error, ServiceError) and error.caused_by_request:
                    log.info("a sequence was refused: %s", error)
                else:
                    log.exception("a sequence failed to run")
                return [error]
            log.warning("a batch of %d failed (%s); retrying in halves", len(items), error)
            half = len(items) // 2
            return self._run_isolated(items[:half]) + self._run_isolated(items[half:])
        if len(results) != len(items):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
        return results
