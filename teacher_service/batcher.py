"""Dynamic batching: sequences from many requests and clients merged into forward passes.

Every bound here is in units of what the model was measured to do (capacity.py: tokens/s
by forward size, from warm-up forwards before the first request and from every forward
since), never in absolute seconds: a forward takes milliseconds for a small model on CPU
cores and seconds for a 70B teacher, and the same rules must hold for both.

When to run: as soon as the queue fills the forward's budget, or holds a request from
every caller seen recently (the peak number of requests in flight over the last two
forwards, at least a second), or its oldest sequence has waited `max_wait_ms` and the model
has been idle for a tenth of a forward (COMPANY_WAIT_FRACTION: callers just answered come
back in milliseconds). So a lone client never waits for company that is not coming, and 8
clients are gathered into one forward instead of being split by the jitter of their
arrivals.

What to run: a forward is formed around the oldest waiting sequence (so nothing starves)
from the sequences closest to it in length (so little padding is computed), up to the
forward budget in padded tokens (rows x longest): the model's efficient batch (the
smallest forward within 90 % of its best measured tokens/s) or FORWARD_REQUESTS requests
of the recent mean size, whichever is more (batching across callers is what the service
is for), and at most `max_batch_tokens` (memory). Never less than the oldest sequence. Not
more: a forward cannot be interrupted, so its length is the latency every request arriving
during it pays first, and past the efficient batch a bigger forward is only longer (on CPU
cores it is slower per token too). The forward runs on the model worker thread, never on
the event loop. A request whose caller goes away (cancel, deadline) takes its queued
sequences out of the queue with it, and is skipped if its batch has not started yet.

What to admit: the queue promises a wait, not a number of tokens. A request's wait is the
work ahead of it at the measured rates: what is left of the running forward, and the full
forwards the queue holds ahead of it. Its own sequences are not ahead of it: a request is
never refused against parts of itself, and one that fits in the next forward is always
admitted. A request whose wait is over `max_queue_forwards` forwards of the budget is
refused at once, with a retry hint (BatcherOverloaded.retry_after), rather than queued
behind minutes of work; callers with deadlines learn at once, and the admitted ones keep a
latency of a few forwards. Until a forward has been measured nothing is refused but by
`max_queued_tokens` (a remote backend's first calls): no estimate is better than a wrong one.

Whose turn: a refused request books a turn, one after another at the measured rate, so
refused callers come back about when the queue has room for each of them, not all at once
into a new refusal (every refusal costs the cores that score). The hint says when. Until
then its room is reserved: a request that arrives meanwhile counts the booked work ahead of
it, so callers answered a moment ago, who send again at once, do not take the turns of
those refused before them (the refused would starve). A turn belongs to the caller's
connection: its resend takes it, early or not, and any request of that connection takes it
once it has come (callers sharing a connection share its turns). A resend back before its
turn (a caller that ignores retry hints and loops) is held until then, as it was told, and
then admitted or refused like any other.

What to drop: a sequence whose deadline passes in the queue, or would pass before its
forward could end, fails with DeadlineExceeded and never reaches a forward; nobody would
read its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

from teacher_client.retry import BACKPRESSURE_JITTER
from teacher_service.capacity import Capacity
from teacher_service.errors import ErrorKind, ServiceError

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Result = TypeVar("Result")
# callers in flight during the last this-many forwards (and at least PEAK_WINDOW_SECONDS)
# are expected in the next forward
PEAK_WINDOW_FORWARDS = 2
PEAK_WINDOW_SECONDS = 1.0
# after a forward, the next one waits up to this fraction of its own time for the callers
# expected back: a caller just answered is back in milliseconds, and a forward without it
# splits the callers into groups that stay apart, each forward half as big (at most this
# fraction of throughput, once, against batches twice the size from then on)
COMPANY_WAIT_FRACTION = 0.1
# a forward has room for this many requests of the recent mean size: batching across
# callers needs a forward bigger than one caller's request, on any hardware
FORWARD_REQUESTS = 4
REQUEST_WEIGHT = 0.1  # the newest request's weight in the mean request size
# a retry hint is when the queue will have room for the refused request, within these
# bounds: never a tight loop, and a later turn is told as 30 s (and held to when back)
RETRY_AFTER_BOUNDS = (0.02, 30.0)


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (Linux, where nice is per thread;
    elsewhere nothing). Raising it needs no privilege; the threads it starts inherit it."""
    if nice and sys.platform == "linux":
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + nice))


class ModelWorker:
    """The one thread that runs model code, so forwards never overlap or block the loop.

    It runs `nice` steps below the rest of the process: on cores it shares with the front
    door, a forward (100 % of a core for its whole length) otherwise delays each of the
    several thread hand-offs a call makes before its handler runs (the gRPC core threads,
    the completion-queue poller, the event loop) by a scheduler slice. Measured with the
    server on one core and 128 clients: refusals p99 120-166 ms at nice 0, 73-91 ms at 10
    (docs/benchmarks.md).
    """

    def __init__(self, nice: int = 0) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="model-worker",
            initializer=lower_thread_priority,
            initargs=(nice,),
        )
        self._waiting: set[asyncio.Future] = set()
        self._idle = threading.Event()  # set while the thread runs nothing
        self._idle.set()
        self._closed = False

    def _timed(self, fn: Callable[..., Result], *args: Any) -> Result:
        self._idle.clear()
        try:
            return fn(*args)
        finally:
            self._idle.set()

    async def run(self, fn: Callable[..., Result], *args: Any) -> Result:
        """fn(*args) on the worker thread. Raises BatcherClosed once the worker is closed,
        even while fn still runs: a shutdown does not wait for a forward to answer."""
        if self._closed:
            raise BatcherClosed("the service is shutting down")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._timed, fn, *args)
        self._waiting.add(future)
        try:
            return await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and future.cancelled() and not (task and task.cancelling()):
                raise BatcherClosed("the service shut down before this finished") from None
            raise
        finally:
            self._waiting.discard(future)

    def close(self, *, wait: bool = True) -> None:
        """Take no more work; those still waiting get BatcherClosed. With `wait`, block
        until the running call ends (never on the event loop: see `join`)."""
        self._closed = True
        for future in list(self._waiting):
            future.cancel()
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the call the thread runs now, if any; True when it is idle."""
        return self._idle.wait(timeout)


class DropReason(Enum):
    """Why sequences left the queue without a forward: a BatcherStats field and the
    teacher_sequences_dropped label (metrics.py creates a series for each)."""

    CANCELLED = "cancelled"  # the caller left
    EXPIRED = "expired"  # the deadline passed, or would have before the forward ended


@dataclass
class BatcherStats:
    batches: int = 0
    sequences: int = 0
    real_tokens: int = 0  # tokens the sequences hold
    padded_tokens: int = 0  # rows x longest, summed over batches: what the forwards computed
    cancelled: int = 0  # sequences dropped from the queue because their caller left
    expired: int = 0  # sequences dropped because their deadline passed, or would in the forward
    wasted: int = 0  # sequences computed whose caller had left by the time they were done
    refused: int = 0  # requests refused at the door: the queue's wait was over its budget
    held: int = 0  # requests held until their caller's booked return (it came back early)


@dataclass(eq=False)
class _Booking:
    """A refused request's turn to come back (loop times), kept for its caller."""

    peer: str  # the caller's connection
    request: str  # what it asked (a digest): a resend asks the same
    returns: float
    expires: float  # its room is reserved until then (the client's jitter, a forward)
    tokens: int
    claimed: bool = False  # the request, back early, waits for it


@dataclass
class _Pending(Generic[Item]):
    item: Item
    length: int
    enqueued_at: float
    submission: int  # which submit() call it came from
    deadline: float | None  # loop time after which the caller no longer waits
    future: asyncio.Future = field(repr=False)


def _read_error(future: asyncio.Future) -> None:
    """Mark a finished future's error as read (asyncio logs unread ones)."""
    if not future.cancelled():
        future.exception()


class BatcherClosed(ServiceError):
    """The batcher shut down before this sequence was run."""

    kind = ErrorKind.SHUTTING_DOWN


class BatcherOverloaded(ServiceError):
    """The queue's wait is over max_queue_forwards (or it holds max_queued_tokens): come
    back after `retry_after` seconds (gRPC RESOURCE_EXHAUSTED / HTTP 429)."""

    kind = ErrorKind.OVERLOADED

    def __init__(self, message: str, *, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed, or would pass before the forward could end."""

    kind = ErrorKind.DEADLINE_EXCEEDED


class BatchObserver(Protocol):
    """Told about every forward pass and every drop (metrics.ServiceMetrics implements it)."""

    def observe_batch(
        self, sizes: list[int], queue_waits: list[float], forward_seconds: float, wasted: int
    ) -> None: ...

    def observe_dropped(self, reason: DropReason, count: int) -> None: ...

    def observe_held(self) -> None: ...


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
        max_queue_forwards: float | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._worker = worker
        self._length = length
        self._budget = max_batch_tokens
        self._max_wait = max_wait_ms / 1000.0
        self._max_queued = max_queued_tokens
        self._max_queue_forwards = max_queue_forwards
        self._request_tokens = 0.0  # the recent mean request size (REQUEST_WEIGHT)
        self._booked_until = 0.0  # loop time up to which refused requests were told to return
        self._bookings: list[_Booking] = []  # refused requests' returns, in that order
        self._observer = observer
        self._queue: list[_Pending[Item]] = []
        self._running: list[_Pending[Item]] = []  # the batch on the worker now
        self._running_since = 0.0
        self._idle_since = 0.0  # loop time the last forward ended
        self._callers = itertools.count()
        self._in_flight = 0  # submit() calls not yet answered
        self._recent_in_flight: deque[tuple[float, int]] = deque()  # (time, in flight) samples
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._admitting = True  # False once draining: queued work runs, new work is refused
        self._closed = False
        self.capacity = Capacity()
        self.stats = BatcherStats()

    @property
    def pending(self) -> int:
        """Sequences queued and not yet in a forward pass."""
        return len(self._queue)

    @property
    def queued_tokens(self) -> int:
        return sum(p.length for p in self._queue)

    def forward_budget(self) -> int:
        """Padded tokens the next forward may hold: the efficient batch or FORWARD_REQUESTS
        requests of the recent mean size, whichever is more, at most max_batch_tokens
        (before anything is measured: max_batch_tokens). The oldest sequence always runs,
        however long."""
        if not self.capacity.measured:
            return self._budget
        wanted = max(self.capacity.efficient_tokens(), FORWARD_REQUESTS * self._request_tokens)
        return max(1, min(self._budget, int(wanted)))

    def estimated_wait(self, reserved: int = 0) -> float:
        """Seconds before a request queued now would start its forward: what is left of the
        running forward (at the rate measured at its size), and the full forwards the queue
        (and `reserved` tokens booked to return before it) hold ahead of it (what is left
        over rides along with it) at the rate recent forwards drained the queue. 0 before
        any measurement."""
        if not self.capacity.measured:
            return 0.0
        left = 0.0
        if self._running:
            elapsed = time.monotonic() - self._running_since  # the loop's clock
            left = max(0.0, self.capacity.seconds(sum(p.length for p in self._running)) - elapsed)
        forward = self.forward_budget()
        full = (self.queued_tokens + reserved) // forward  # forwards that run before it, FIFO
        return left + self.capacity.drain_seconds(full * forward)

    def queue_budget(self) -> float | None:
        """The longest wait admission lets a request take: max_queue_forwards forwards of
        the budget, at the rate recent forwards drained the queue (None: no bound, or
        nothing measured)."""
        if self._max_queue_forwards is None or not self.capacity.measured:
            return None
        return self._max_queue_forwards * self.capacity.drain_seconds(self.forward_budget())

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="dynamic-batcher")

    def stop_admitting(self) -> None:
        """Drain: what is queued still runs; every submit() from now on gets BatcherClosed."""
        self._admitting = False

    async def close(self) -> None:
        """Fail what is queued or running, and from now on every submit(), with BatcherClosed
        (a forward still on the worker finishes there, for nobody)."""
        self._closed = True
        running = self._running  # the cancelled loop forgets the forward it was waiting for
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for pending in self._queue + running:
            if not pending.future.done():
                pending.future.set_exception(BatcherClosed("the service is shutting down"))
        self._queue.clear()
        self._running = []

    async def submit(
        self,
        items: Sequence[Item],
        *,
        deadline: float | None = None,
        caller: tuple[str, str] | None = None,
    ) -> list[Result]:
        """Queue items; return their results in order. Raises what running an item raised,
        BatcherOverloaded at once when the queue is over its budget, DeadlineExceeded when
        `deadline` (loop time, i.e. time.monotonic()) passes first. `caller` is (its
        connection, a digest of the request): a refused request's turn is its connection's
        (_claim), and a resend back before its hint is held until then first (_hold)."""
        if self._closed or not self._admitting:  # nothing would ever run it
            raise BatcherClosed("the service is shutting down")
        loop = asyncio.get_running_loop()
        if deadline is not None and deadline <= loop.time():
            self._dropped(DropReason.EXPIRED, len(items))
            raise DeadlineExceeded("the caller's deadline passed before the request was queued")
        booking = None if caller is None else self._claim(*caller, deadline, loop.time())
        if booking is not None:
            await self._hold(booking, loop)
            if self._closed or not self._admitting:
                raise BatcherClosed("the service is shutting down")
        now, submission = loop.time(), next(self._callers)
        lengths = [self._length(item) for item in items]
        self._admit(sum(lengths), caller, booking)
        if self._request_tokens:
            self._request_tokens += REQUEST_WEIGHT * (sum(lengths) - self._request_tokens)
        else:
            self._request_tokens = float(sum(lengths))
        futures = [loop.create_future() for _ in items]
        for item, length, future in zip(items, lengths, futures):
            self._queue.append(_Pending(item, length, now, submission, deadline, future))
        self._in_flight += 1
        self._recent_in_flight.append((now, self._in_flight))
        self._arrived.set()
        timeout = None if deadline is None else deadline - now
        results = asyncio.gather(*futures)
        # the caller may be cancelled (gRPC, at its deadline) while wait_for is cancelling
        # `results` after its own timeout: nobody would read their error, and asyncio would
        # log it at ERROR when collected
        results.add_done_callback(_read_error)
        try:
            return list(await asyncio.wait_for(results, timeout))
        except BaseException as error:
            for future in futures:
                future.cancel()
            # asyncio's own TimeoutError: the builtin one only from Python 3.11. gRPC cancels
            # a call at its deadline, when wait_for's own timeout fires: whichever comes
            # first, a caller gone at or past its deadline has expired
            expired = isinstance(error, (asyncio.TimeoutError, DeadlineExceeded)) or (
                deadline is not None and loop.time() >= deadline
            )
            self._drop_gone(DropReason.EXPIRED if expired else DropReason.CANCELLED)
            if isinstance(error, asyncio.TimeoutError):
                raise DeadlineExceeded(
                    "the caller's deadline passed before its sequences were scored"
                ) from None
            raise
        finally:
            self._in_flight -= 1

    def _claim(
        self, peer: str, request: str, deadline: float | None, now: float
    ) -> _Booking | None:
        """The turn this request takes, if its connection holds one: its own booking when it
        is a resend (early or not: one back early waits for it, _hold), else the
        connection's earliest turn that has come (a caller back with a request of its own;
        callers that share a connection share its turns). None: a newcomer. Refuses at once,
        with what is left of the hint, a resend back early whose deadline comes before its
        turn, so that it can go elsewhere."""
        self._bookings = [b for b in self._bookings if b.claimed or b.expires > now]
        mine = [b for b in self._bookings if b.peer == peer and not b.claimed]
        booking = next((b for b in mine if b.request == request), None)
        if booking is None:
            booking = next((b for b in mine if b.returns <= now), None)
        if booking is None:
            return None
        early = booking.returns > now
        if early and deadline is not None and deadline <= booking.returns:
            self.stats.refused += 1
            wait = booking.returns - now
            raise BatcherOverloaded(
                f"the teacher's queue is over its budget: this caller was told to retry in "
                f"{wait:.2f} s",
                retry_after=max(RETRY_AFTER_BOUNDS[0], wait),
            )
        booking.claimed = True
        return booking

    async def _hold(self, booking: _Booking, loop: asyncio.AbstractEventLoop) -> None:
        """A request back before its turn (its caller ignores retry hints, retrying in a
        tight loop) waits here until then, as it was told, and is then admitted or refused
        like any other: each refusal costs the cores that score, and its turn is its share.
        A caller gone meanwhile gives its turn up."""
        wait = booking.returns - loop.time()
        if wait <= 0:
            return
        self.stats.held += 1
        if self._observer is not None:
            self._observer.observe_held()
        try:
            await asyncio.sleep(wait)
        except BaseException:
            self._bookings.remove(booking)
            raise

    def _reserved_ahead(self, booking: _Booking | None) -> int:
        """Tokens of refused requests booked to come back before this request's turn: all
        of them for a newcomer, those booked before it for one back at its turn (whose own
        booking ends here)."""
        if booking is None:
            return sum(b.tokens for b in self._bookings)
        self._bookings.remove(booking)
        return sum(b.tokens for b in self._bookings if b.returns < booking.returns)

    def _admit(
        self, tokens: int, caller: tuple[str, str] | None = None, booking: _Booking | None = None
    ) -> None:
        """Refuse (BatcherOverloaded) a request the queue cannot serve within its budget:
        the work queued and the refused work booked to come back before it."""
        reserved = self._reserved_ahead(booking)  # first: a claimed turn ends here, whatever
        if self._max_queued is not None and self.queued_tokens + tokens > self._max_queued:
            self.stats.refused += 1
            # no hint for a request over the cap by itself: coming back would not help
            alone_too_big = tokens > self._max_queued
            raise BatcherOverloaded(
                f"the teacher's queue is full ({self.queued_tokens} tokens waiting + {tokens} "
                f"asked, max_queued_tokens = {self._max_queued})"
                + (": the request alone is over it" if alone_too_big else ": retry later"),
                retry_after=None
                if alone_too_big
                else self._book_retry(
                    tokens, caller, self.queued_tokens + tokens - self._max_queued
                ),
            )
        budget = self.queue_budget()
        if budget is None or self.queued_tokens < self.forward_budget():
            return  # the next forward has room: it joins it (no turn to come idles the model)
        wait = self.estimated_wait(reserved)
        if wait > budget:
            self.stats.refused += 1
            hint = self._book_retry(tokens, caller, wait=wait - budget)
            forward = self.forward_budget()
            rate = forward / self.capacity.drain_seconds(forward)
            raise BatcherOverloaded(
                f"the teacher's queue holds {wait:.2f} s of work, over max_queue_forwards = "
                f"{self._max_queue_forwards:g} forwards of {forward} tokens ({budget:.2f} s at "
                f"{rate:.0f} tokens/s): retry in {hint:.2f} s",
                retry_after=hint,
            )

    def _book_retry(
        self, tokens: int, caller: tuple[str, str] | None, excess: int = 0, *, wait: float = 0.0
    ) -> float:
        """The retry hint for a refused request of `tokens`: the queue has room for it once
        `excess` queued tokens have run, or in `wait` seconds, after the requests refused
        before it, which were booked to return one after another at the measured rate
        (the hint within RETRY_AFTER_BOUNDS; before any measurement: the shortest, booking
        nothing). A caller's booking reserves the request's room (_reserved_ahead) for its
        connection's next request at its turn (_claim)."""
        now = time.monotonic()  # the loop's clock
        low, high = RETRY_AFTER_BOUNDS
        if not self.capacity.measured:
            return low
        until_room = wait + self.capacity.drain_seconds(excess)
        returns = max(now + until_room, self._booked_until)
        self._booked_until = returns + self.capacity.drain_seconds(tokens)
        if caller is not None:  # late by the client's jitter, or a forward: still its turn
            late = BACKPRESSURE_JITTER * (returns - now) + self._forward_seconds()
            self._bookings.append(_Booking(*caller, returns, returns + late, tokens))
        # a turn past the bound is told as the bound: back then, it is held to its turn
        return min(high, max(low, returns - now))

    def _expected_callers(self, now: float) -> int:
        """The most requests that were in flight at once during the last PEAK_WINDOW_FORWARDS
        forwards (at least PEAK_WINDOW_SECONDS)."""
        window = PEAK_WINDOW_SECONDS
        if self.capacity.measured:
            window = max(window, PEAK_WINDOW_FORWARDS * self._forward_seconds())
        recent = self._recent_in_flight
        while len(recent) > 1 and now - recent[0][0] > window:
            recent.popleft()
        return max(count for _, count in recent)

    def _forward_seconds(self) -> float:
        """How long a forward of the budget takes, at the rate recent forwards ran."""
        return self.capacity.drain_seconds(self.forward_budget())

    def _run_at(self) -> float:
        """When the next forward runs at the latest without every expected caller: once the
        oldest sequence has waited max_wait_ms and the model has been idle for
        COMPANY_WAIT_FRACTION of a forward."""
        company = COMPANY_WAIT_FRACTION * self._forward_seconds() if self.capacity.measured else 0
        return max(self._queue[0].enqueued_at + self._max_wait, self._idle_since + company)

    def _ready(self, now: float) -> bool:
        """Run now: the budget is full, every expected caller is in, or the wait is over."""
        if self.queued_tokens >= self.forward_budget():
            return True
        if len({p.submission for p in self._queue}) >= self._expected_callers(now):
            return True
        return now >= self._run_at()

    def _dropped(self, reason: DropReason, count: int) -> None:
        if count:
            setattr(self.stats, reason.value, getattr(self.stats, reason.value) + count)
            if self._observer is not None:
                self._observer.observe_dropped(reason, count)

    def _drop_gone(self, reason: DropReason = DropReason.CANCELLED) -> None:
        """Take sequences whose caller left (their future is done) out of the queue."""
        kept = [p for p in self._queue if not p.future.done()]
        self._dropped(reason, len(self._queue) - len(kept))
        self._queue = kept

    def _drop_hopeless(self, batch: list[_Pending[Item]], now: float) -> list[_Pending[Item]]:
        """Fail, before the forward, sequences whose deadline passes before it would end
        (once a forward has been measured)."""
        if not self.capacity.measured or all(p.deadline is None for p in batch):
            return batch
        ends = now + self.capacity.seconds(sum(p.length for p in batch))
        kept = [p for p in batch if p.deadline is None or p.deadline >= ends]
        for pending in batch:
            if pending.deadline is not None and pending.deadline < ends:
                pending.future.set_exception(
                    DeadlineExceeded("the caller's deadline would pass before its forward ended")
                )
        self._dropped(DropReason.EXPIRED, len(batch) - len(kept))
        return kept

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            self._drop_gone()
            while self._queue and not self._ready(loop.time()):
                remaining = self._run_at() - loop.time()
                with contextlib.suppress(asyncio.TimeoutError):  # waited enough
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                self._arrived.clear()
                self._drop_gone()
            if not self._queue:
                continue
            batch = self._drop_hopeless(self._take_batch(), loop.time())
            if batch:
                await self._run(batch, loop)
            if self._queue:
                self._arrived.set()

    async def _run(self, batch: list[_Pending[Item]], loop: asyncio.AbstractEventLoop) -> None:
        """One forward on the worker; results to the callers still waiting."""
        self._running, started = batch, loop.time()
        self._running_since = started
        try:
            outcomes = await self._worker.run(self._run_live, batch)
        finally:
            self._running = []
            self._idle_since = loop.time()
        seconds = self._idle_since - started
        ran = [p for p, outcome in zip(batch, outcomes) if outcome is not None]
        wasted = sum(p.future.done() for p in ran)  # their caller left during the forward
        self._count(ran, wasted)
        self.capacity.observe(sum(p.length for p in ran), seconds)
        if ran and self._observer is not None:
            self._observer.observe_batch(
                [p.length for p in ran], [started - p.enqueued_at for p in ran], seconds, wasted
            )
        for pending, outcome in zip(batch, outcomes):
            if pending.future.done():
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)

    def _take_batch(self) -> list[_Pending[Item]]:
        """The oldest sequence plus those nearest it in length, within the token budget."""
        oldest = self._queue[0]
        nearest = sorted(
            self._queue[1:], key=lambda p: (abs(p.length - oldest.length), p.enqueued_at)
        )
        batch, longest, budget = [oldest], oldest.length, self.forward_budget()
        for pending in nearest:
            wider = max(longest, pending.length)
            if wider * (len(batch) + 1) <= budget:
                batch.append(pending)
                longest = wider
        taken = {id(p) for p in batch}
        self._queue = [p for p in self._queue if id(p) not in taken]
        return batch

    def _count(self, ran: list[_Pending[Item]], wasted: int) -> None:
        if ran:
            self.stats.wasted += wasted
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
