"""The caller's deadline and who it is, from the front end that received the call to the
batcher.

gRPC carries a deadline with every call (`context.time_remaining()`); HTTP has none, so
a caller may send `X-Request-Timeout: <seconds>`. The front end records it here, in a
context variable of the task serving the call, so that every dialect's request-building
code stays as it is and the engine reads it in one place. Times are `time.monotonic()`,
the event loop's clock. The caller's peer (its connection: a gRPC peer, an HTTP client's
host:port, a ZeroMQ identity) lets the batcher hold a caller that comes back before the
retry hint it was given (batcher.py).
"""

from __future__ import annotations

import math
import time
from contextvars import ContextVar

from teacher_service.errors import RequestError

TIMEOUT_HEADER = "X-Request-Timeout"
# (deadline or None, a malformed header's complaint): the complaint is raised when the
# request is served, so each dialect answers it in its own error shape
_caller: ContextVar[tuple[float | None, str | None]] = ContextVar(
    "caller_deadline", default=(None, None)
)


def set_timeout(seconds: float | None) -> None:
    """The caller waits `seconds` more from now (None: no deadline)."""
    _caller.set((None if seconds is None else time.monotonic() + seconds, None))


def set_timeout_header(value: str | None) -> None:
    """An HTTP request's X-Request-Timeout: seconds, a finite number >= 0."""
    if value is None:
        return set_timeout(None)
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        _caller.set((None, f"{TIMEOUT_HEADER} = {value[:40]!r}: expected seconds, a number >= 0"))
        return None
    return set_timeout(seconds)


_peer: ContextVar[str | None] = ContextVar("caller_peer", default=None)


def set_peer(peer: str | None) -> None:
    """The serving task's caller: its connection, as the front end names it."""
    _peer.set(peer)


def caller_peer() -> str | None:
    """The serving task's caller (None: unknown, e.g. in-process)."""
    return _peer.get()


def caller_deadline() -> float | None:
    """The serving task's deadline (time.monotonic()), None without one."""
    deadline, problem = _caller.get()
    if problem is not None:
        raise RequestError(problem, field=TIMEOUT_HEADER)
    return deadline
