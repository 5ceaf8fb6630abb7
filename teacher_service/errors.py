"""Why a request failed, as a kind, and the one table of what each kind is on the wire.

Every failure a front end can report has a kind (ErrorKind), a message naming the field
and the limit, and the field's path in the caller's own terms (`sequences[3]` over gRPC,
`prompt[1]` in the vLLM dialect: the front end told validation what it calls things).
STATUS is the only place where kinds meet gRPC codes and HTTP statuses; each front end
has one handler that applies it (frontends/grpc_api.py, frontends/http/errors.py).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus

import grpc
import torch

log = logging.getLogger(__name__)


class ErrorKind(Enum):
    INVALID_ARGUMENT = "invalid_argument"
    TOO_LARGE = "too_large"
    UNSUPPORTED = "unsupported"
    MALFORMED_BODY = "malformed_body"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    SHUTTING_DOWN = "shutting_down"
    OUT_OF_MEMORY = "out_of_memory"
    UPSTREAM_FAILED = "upstream_failed"
    INTERNAL = "internal"


@dataclass(frozen=True)
class Status:
    grpc: grpc.StatusCode
    http: int
    when: str  # for readers of the table (docs, the error-table test)


STATUS: dict[ErrorKind, Status] = {
    ErrorKind.INVALID_ARGUMENT: Status(
        grpc.StatusCode.INVALID_ARGUMENT, 422, "a field breaks the API's rules"
    ),
    ErrorKind.TOO_LARGE: Status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "a request over a configured limit"
    ),
    ErrorKind.UNSUPPORTED: Status(
        grpc.StatusCode.UNIMPLEMENTED, 422, "the backend lacks the capability asked for"
    ),
    ErrorKind.MALFORMED_BODY: Status(
        grpc.StatusCode.INVALID_ARGUMENT, 400, "a body / message that does not decode"
    ),
    ErrorKind.OVERLOADED: Status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "the queue's wait is over its budget: retry later"
    ),
    ErrorKind.DEADLINE_EXCEEDED: Status(
        grpc.StatusCode.DEADLINE_EXCEEDED, 504, "the caller's deadline passed before its work ran"
    ),
    ErrorKind.SHUTTING_DOWN: Status(
        grpc.StatusCode.UNAVAILABLE, 503, "the service stopped before running it"
    ),
    ErrorKind.OUT_OF_MEMORY: Status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 507, "the forward pass ran out of memory"
    ),
    ErrorKind.UPSTREAM_FAILED: Status(
        grpc.StatusCode.INTERNAL, 500, "a remote backend's upstream failed"
    ),
    ErrorKind.INTERNAL: Status(grpc.StatusCode.INTERNAL, 500, "anything unexpected (a bug)"),
}

# every status label a failed request's metrics can carry (metrics.FrontEndLabels): the
# table's, plus gRPC's CANCELLED for a caller that left (frontends/grpc_api.py) and HTTP's 401 for a
# missing or wrong bearer token (frontends/http/app.py)
GRPC_FAILURE_CODES = tuple(
    sorted({s.grpc.name for s in STATUS.values()} | {grpc.StatusCode.CANCELLED.name})
)
HTTP_FAILURE_CODES = tuple(
    sorted({str(s.http) for s in STATUS.values()} | {str(HTTPStatus.UNAUTHORIZED.value)})
)

# the caller can fix these by changing the request; the others are the service's trouble
CALLER_KINDS = frozenset(
    {
        ErrorKind.INVALID_ARGUMENT,
        ErrorKind.TOO_LARGE,
        ErrorKind.UNSUPPORTED,
        ErrorKind.MALFORMED_BODY,
    }
)
# logged with a traceback by whichever front end reports them
UNEXPECTED_KINDS = frozenset({ErrorKind.UPSTREAM_FAILED, ErrorKind.INTERNAL})


class ServiceError(Exception):
    """A failure the service reports as its kind; `field` is the caller's path to the cause."""

    kind = ErrorKind.INTERNAL
    retry_after: float | None = None  # seconds: back-pressure, the caller may come back then

    def __init__(
        self, message: str, *, field: str | None = None, kind: ErrorKind | None = None
    ) -> None:
        super().__init__(message)
        self.field = field
        if kind is not None:
            self.kind = kind

    @property
    def caused_by_request(self) -> bool:
        """The batcher logs such failures without a traceback."""
        return self.kind in CALLER_KINDS


class RequestError(ServiceError):
    """A request the service will not run: invalid, or over a limit (kind TOO_LARGE)."""

    kind = ErrorKind.INVALID_ARGUMENT


class Unsupported(ServiceError):
    """A request this backend cannot answer (a remote upstream lacks the capability)."""

    kind = ErrorKind.UNSUPPORTED


@dataclass(frozen=True)
class Failure:
    """What a front end reports: the kind, the message and the field it names."""

    kind: ErrorKind
    message: str
    field: str | None
    retry_after: float | None = None  # seconds, sent as the front end's retry hint

    @property
    def status(self) -> Status:
        return STATUS[self.kind]


def classify(error: BaseException) -> Failure:
    """The kind and message of any exception (no side effects: metrics use it too)."""
    if isinstance(error, ServiceError):
        return Failure(error.kind, str(error), error.field, error.retry_after)
    if isinstance(error, torch.OutOfMemoryError):
        return Failure(ErrorKind.OUT_OF_MEMORY, f"the teacher ran out of memory: {error}", None)
    return Failure(
        ErrorKind.INTERNAL,
        f"the teacher failed on this request: {type(error).__name__}: {error}",
        None,
    )


def report(error: BaseException) -> Failure:
    """classify(), logging the unexpected with their traceback: every front end's handler."""
    failure = classify(error)
    if failure.kind in UNEXPECTED_KINDS:
        log.error("request failed", exc_info=error)
    return failure


class PeerWarnings:
    """One WARNING per client host per `every_s` (then with the count since), no traceback:
    a client that sends garbage in a loop must not be able to flood the log. The port is
    left out of the key, so reconnecting does not reset it; at most `hosts` are tracked."""

    def __init__(self, every_s: float = 60.0, hosts: int = 4096) -> None:
        self.every_s, self._hosts = every_s, hosts
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()  # host -> (logged, since)

    @staticmethod
    def host(peer: str) -> str:
        """ipv4:1.2.3.4:5678 -> ipv4:1.2.3.4 ([::1] likewise); unix: peers have no port."""
        return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer

    def warn(self, peer: str, message: str) -> None:
        host, now = self.host(peer), time.monotonic()
        logged, since = self._seen.pop(host, (-float("inf"), 0))
        if now - logged < self.every_s:
            self._seen[host] = (logged, since + 1)
            return
        more = f" ({since} more since the last warning)" if since else ""
        log.warning("%s: %s%s", host, message, more)  # a caller's fault: no traceback
        self._seen[host] = (now, 0)
        while len(self._seen) > self._hosts:
            self._seen.popitem(last=False)
