"""The HTTP front end's one error handler: any exception -> status, message, field, kind.

The status is errors.STATUS's for the kind, whichever dialect; each dialect only words
the result into its own body (native {"error"}, OpenAI {"error": {...}}, TGI
{"error", "error_type"}), and adds `error_headers` (Retry-After on back-pressure).
Unexpected failures are logged with their traceback.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from teacher_service.errors import ErrorKind, classify, report


class HttpError(NamedTuple):
    status: int
    message: str
    field: str | None
    kind: ErrorKind


def printable(text: str) -> str:
    """`text` as UTF-8 can carry it: a field name from a hostile body may hold a lone
    surrogate (JSON's "\\ud800"), which would make encoding the error itself fail (a 500)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def http_error(error: Exception) -> HttpError:
    failure = report(error)
    field = None if failure.field is None else printable(failure.field)
    return HttpError(failure.status.http, printable(failure.message), field, failure.kind)


def error_headers(error: Exception) -> dict[str, str]:
    """`Retry-After` when the service refused for back-pressure: whole seconds (RFC 9110's
    delay-seconds), rounded up, so the caller never comes back before the hint."""
    retry_after = classify(error).retry_after
    return {} if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
