"""Reading a request body, the same way for every dialect: size, encoding, schema.

A body over max_message_bytes is refused before it is decoded (TOO_LARGE); one that is
not JSON (or msgpack, where the dialect takes it) is MALFORMED_BODY; one of the wrong
shape is a SchemaError, whose message each dialect words its own way (`describe`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
from fastapi import Request
from pydantic import BaseModel, ValidationError

from teacher_service.errors import ErrorKind, RequestError, ServiceError

Body = TypeVar("Body", bound=BaseModel)
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


async def read_body(
    request: Request, model: type[Body], describe: Describe, *, msgpack_ok: bool = False
) -> Body:
    """The body as `model`; msgpack when `msgpack_ok` and the Content-Type says so."""
    raw = await request.body()
    limit = request.app.state.engine.config.limits.max_message_bytes
    if len(raw) > limit:
        raise RequestError(
            f"the request body has {len(raw)} bytes, over max_message_bytes = {limit}",
            kind=ErrorKind.TOO_LARGE,
        )
    packed = msgpack_ok and "msgpack" in request.headers.get("content-type", "")
    try:
        decoded = msgpack.unpackb(raw, raw=False) if packed else json.loads(raw or b"null")
    except (ValueError, RecursionError, msgpack.UnpackException) as error:
        raise BodyError(
            f"the body is not valid {'msgpack' if packed else 'JSON'}: {error}"
        ) from None
    try:
        return model.model_validate(decoded)
    except ValidationError as error:
        problems = error.errors()
        raise SchemaError(*describe(problems), problems) from None
