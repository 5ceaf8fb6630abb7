"""When a failed call is tried again, within its deadline: UNAVAILABLE (a replica down or
restarting) with exponential backoff, and back-pressure (RESOURCE_EXHAUSTED carrying the
server's `retry-after` hint: its queue is over its wait budget) after the hint."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

RETRY_AFTER_KEY = "retry-after"  # trailing metadata: seconds, as a decimal number
# a hinted retry waits hint x uniform(1, 1 + this): callers refused together do not all
# come back in the same instant
BACKPRESSURE_JITTER = 0.5


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
