"""When a failed call is tried again, within its deadline: UNAVAILABLE (a replica down or
restarting) with exponential backoff, and back-pressure (RESOURCE_EXHAUSTED carrying the
server's `retry-after` hint: its queue is over its wait budget) after the hint. And what
a client says meanwhile (OutageLog): that it waits for the service, and when it is back."""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after"  # trailing metadata: seconds, as a decimal number
# a hinted retry waits hint x uniform(1, 1 + this). Small, because the server already
# spreads its hints (each refused request is booked after the ones refused before it),
# and a caller back late leaves the device idle once the queue has run dry
BACKPRESSURE_JITTER = 0.1


def retry_after(error: grpc.RpcError) -> float | None:
    """The server's retry hint in seconds, when it refused the call for back-pressure."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None  # the same code means too large (413) or out of memory: not retried
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter on UNAVAILABLE, up to `max_retries` of them
    (None: as many as the deadline allows); back-pressure retries follow the server's hint
    and are bounded by the deadline only (the server said when it will have room)."""

    max_retries: int | None = 10
    initial_backoff: float = 0.1
    max_backoff: float = 5.0

    def delay(self, attempt: int) -> float:
        ceiling = self.initial_backoff * 2 ** min(attempt, 30)  # no float overflow
        return random.uniform(0, min(self.max_backoff, ceiling))

    def next_delay(
        self, error: grpc.RpcError, attempt: int, deadline: float | None
    ) -> float | None:
        """Seconds to wait before retrying, or None to give up and raise. `attempt`:
        the UNAVAILABLE retries so far (counts_as_attempt says which errors count)."""
        hint = retry_after(error)
        exhausted = self.max_retries is not None and attempt >= self.max_retries
        if hint is not None:
            delay = hint * random.uniform(1.0, 1.0 + BACKPRESSURE_JITTER)
        elif error.code() != grpc.StatusCode.UNAVAILABLE or exhausted:
            return None
        else:
            delay = self.delay(attempt)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay

    @staticmethod
    def counts_as_attempt(error: grpc.RpcError) -> bool:
        """Back-pressure retries do not use up max_retries."""
        return retry_after(error) is None


DEFAULT_RETRY = RetryPolicy()  # frozen: safe to share as a default argument
OUTAGE_WARNING_EVERY_S = 10.0  # at most one "unavailable" warning per client this often


class OutageLog:
    """What a client's calls say while they wait out an outage (UNAVAILABLE retried), one
    per client, shared by its calls (threads or tasks):

        WARNING teacher service at HOST:PORT unavailable (DETAILS); retrying for up to 287 s more
        WARNING teacher service at HOST:PORT is back after 12.3 s

    The first line at most every `every` seconds, however many calls retry how often; the
    second once, when a call that waited gets its answer (seconds since the outage was
    first seen). Back-pressure retries are the service's pacing, not an outage: DEBUG."""

    def __init__(self, target: str, every: float = OUTAGE_WARNING_EVERY_S) -> None:
        self.target, self.every = target, every
        self._lock = threading.Lock()
        self._down_since: float | None = None  # the outage's first failure (monotonic)
        self._warned_at: float | None = None  # the last warning, this outage or an earlier one
        self._warned = False  # this outage has been warned about

    def retrying(self, error: grpc.RpcError, delay: float, deadline: float | None) -> bool:
        """Note a call about to be retried in `delay` s; True when it is waiting out an
        outage (UNAVAILABLE), False for back-pressure."""
        now = time.monotonic()
        if retry_after(error) is not None:
            log.debug("teacher service at %s is busy; retrying in %.2f s", self.target, delay)
            return False
        with self._lock:
            if self._down_since is None:
                self._down_since, self._warned = now, False
            if self._warned_at is not None and now - self._warned_at < self.every:
                return True
            self._warned_at, self._warned = now, True
        left = "with no deadline" if deadline is None else f"for up to {deadline - now:.0f} s more"
        details = " ".join((error.details() or error.code().name).split())  # one line
        log.warning(
            "teacher service at %s unavailable (%s); retrying %s", self.target, details, left
        )
        return True

    def back(self) -> None:
        """A call that waited out an outage got its answer (the first such call says so)."""
        now = time.monotonic()
        with self._lock:
            since, warned = self._down_since, self._warned
            self._down_since, self._warned = None, False
        if since is not None:  # unwarned (a blip inside the rate limit): DEBUG
            level = logging.WARNING if warned else logging.DEBUG
            log.log(level, "teacher service at %s is back after %.1f s", self.target, now - since)
