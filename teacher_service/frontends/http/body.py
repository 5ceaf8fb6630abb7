"""Reading a request body, the same way for every dialect: size, encoding, schema.

A body over max_message_bytes is refused before it is decoded (TOO_LARGE); one that is
not JSON (or msgpack, where the dialect takes it), is nested deeper than the decoder
recurses or never arrives whole is MALFORMED_BODY; one of the wrong shape is a
SchemaError, whose message each dialect words its own way (`describe`). JSON's NaN and
Infinity are decoded, so that the schema or validation names the field they are in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from teacher_service.errors import ErrorKind, RequestError, ServiceError
from teacher_service.frontends.http.errors import printable

Body = TypeVar("Body", bound=BaseModel)
# JSON can spell a lone surrogate, as "\ud800" or as its bytes (ED A0..BF): no Unicode
# text, so echoing it back could not be encoded (a 500). Only a body that may hold one is
# searched for it: token-id bodies cost nothing. (msgpack's strings are strict UTF-8.)
MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
NOT_TEXT = "not Unicode text: it holds a lone surrogate (\\ud800 to \\udfff unpaired)"
# pydantic's errors -> (the message, the field path) in a dialect's words
Describe = Callable[[list[dict[str, Any]]], tuple[str, str | None]]


class BodyError(ServiceError):
    """A body that is not JSON / msgpack, or not the expected shape (HTTP 400)."""

    kind = ErrorKind.MALFORMED_BODY


class SchemaError(RequestError):
    """A body that does not fit the dialect's schema; `problems` are pydantic's errors."""

    def __init__(self, message: str, field: str | None, problems: list[dict[str, Any]]) -> None:
        super().__init__(message, field=field)
        self.problems = problems


def problems_of(error: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors as an error body can carry them: without the offending input (a
    hostile body's NaN, raw bytes, megabytes or 900 levels of lists are not echoed back;
    JSON cannot even encode the first two) and with text UTF-8 can encode."""
    return [
        {
            "type": problem["type"],
            "loc": tuple(printable(p) if isinstance(p, str) else p for p in problem["loc"]),
            "msg": printable(problem["msg"]),
        }
        for problem in error.errors(include_url=False, include_input=False)
    ]


def lone_surrogate_at(value: Any) -> tuple | None:
    """The path to a string (a key or a value) that is not Unicode text, if any; iterative,
    as the value may be nested as deeply as the decoder recurses."""
    stack: list[tuple[tuple, Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str) and not _is_text(item):
            return path
        if isinstance(item, dict):
            for key, child in item.items():
                if not _is_text(key):
                    return (*path, key)
                stack.append(((*path, key), child))
        elif isinstance(item, list):
            stack.extend(((*path, n), child) for n, child in enumerate(item))
    return None


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def read_body(
    request: Request, model: type[Body], describe: Describe, *, msgpack_ok: bool = False
) -> Body:
    """The body as `model`; msgpack when `msgpack_ok` and the Content-Type says so."""
    try:
        raw = await request.body()
    except ClientDisconnect:  # gone, or closed by the server's body read timeout
        raise BodyError("body: the connection closed before the whole body arrived") from None
    limit = request.app.state.engine.config.limits.max_message_bytes
    if len(raw) > limit:
        raise RequestError(
            f"the request body has {len(raw)} bytes, over max_message_bytes = {limit}",
            kind=ErrorKind.TOO_LARGE,
        )
    packed = msgpack_ok and "msgpack" in request.headers.get("content-type", "")
    encoding = "msgpack" if packed else "JSON"
    try:
        decoded = msgpack.unpackb(raw, raw=False) if packed else json.loads(raw or b"null")
    except (RecursionError, msgpack.StackError):  # e.g. 100,000 `[`: before any schema
        raise BodyError(f"body: nested too deeply to decode as {encoding}") from None
    except (ValueError, msgpack.UnpackException) as error:
        raise BodyError(f"the body is not valid {encoding}: {error}") from None
    path = lone_surrogate_at(decoded) if not packed and MAYBE_SURROGATE.search(raw) else None
    if path is not None:
        loc = tuple(printable(p) if isinstance(p, str) else p for p in path)
        problems = [{"type": "string_unicode", "loc": loc, "msg": NOT_TEXT}]
        raise SchemaError(*describe(problems), problems)
    try:
        return model.model_validate(decoded)
    except ValidationError as error:
        problems = problems_of(error)
        raise SchemaError(*describe(problems), problems) from None
