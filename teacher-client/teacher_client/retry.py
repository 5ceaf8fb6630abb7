"""When a failed call is tried again: UNAVAILABLE only, with backoff, within its deadline."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, on UNAVAILABLE only, within the call's deadline."""

    max_retries: int = 10
    initial_backoff: float = 0.1
    max_backoff: float = 5.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff, self.initial_backoff * 2**attempt))

    def next_delay(
        self, error: grpc.RpcError, attempt: int, deadline: float | None
    ) -> float | None:
        """Seconds to wait before retrying, or None to give up and raise."""
        if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.max_retries:
            return None
        delay = self.delay(attempt)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay


DEFAULT_RETRY = RetryPolicy()  # frozen: safe to share as a default argument
