"""The HTTP front end's one error handler: any exception -> status, message, field, kind.

The status is errors.STATUS's for the kind, whichever dialect; each dialect only words
the result into its own body (native {"error"}, OpenAI {"error": {...}}, TGI
{"error", "error_type"}). Unexpected failures are logged with their traceback.
"""

from __future__ import annotations

from typing import NamedTuple

from teacher_service.errors import ErrorKind, report


class HttpError(NamedTuple):
    status: int
    message: str
    field: str | None
    kind: ErrorKind


def http_error(error: Exception) -> HttpError:
    failure = report(error)
    return HttpError(failure.status.http, failure.message, failure.field, failure.kind)
