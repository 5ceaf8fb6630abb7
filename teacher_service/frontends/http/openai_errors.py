"""The vLLM/OpenAI dialect's errors: OpenAI's {"error": {"message", "type", "param", "code"}}.

Statuses are errors.STATUS's (422 invalid, 400 not JSON, 413 too large, 429 overloaded,
503 stopping), except where vLLM answers otherwise and the SDK tells them apart by status:
an unknown `model` is 404 (openai.NotFoundError), a chat template that is missing or fails
to render is 400 (openai.BadRequestError). An unknown route under /v1/ is a 404 in the
same shape, naming the route and the routes served, so the SDK's NotFoundError says why.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from teacher_service.errors import ErrorKind, RequestError
from teacher_service.frontends.http.errors import error_headers, http_error, printable

ERROR_TYPES = {
    ErrorKind.OVERLOADED: "rate_limit_error",
    ErrorKind.SHUTTING_DOWN: "service_unavailable_error",
}


class VllmStatusError(RequestError):
    """A request error vLLM answers with its own status and type (not the kind's)."""

    status = 422
    error_type = "invalid_request_error"


class ModelNotFound(VllmStatusError):
    """A `model` other than the served one: vLLM's 404 (`OpenAIServing._check_model`)."""

    status, error_type = 404, "NotFoundError"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", field="model")


class ChatTemplateError(VllmStatusError):
    """No chat template, or one that does not render these messages: vLLM's 400."""

    status, error_type = 400, "BadRequestError"


def error_body(status: int, message: str, error_type: str, param: str | None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def error_response(error: Exception) -> JSONResponse:
    """OpenAI's error object; `param` is the field the error names, in this body's terms."""
    status, message, field, kind = http_error(error)
    error_type = ERROR_TYPES.get(kind) or (
        "invalid_request_error" if status < 500 else "server_error"
    )
    if isinstance(error, VllmStatusError):
        status, error_type = error.status, error.error_type
    return JSONResponse(
        status_code=status,
        content=error_body(status, message, error_type, field),
        headers=error_headers(error),
    )


async def unknown_route(request: Request, error: HTTPException) -> Response:
    """No route matched a path under /v1/: a 404 in OpenAI's shape (the SDK raises
    NotFoundError with this message); elsewhere, or raised by a route, FastAPI's answer."""
    path = request.url.path
    unmatched = error.status_code == 404 and request.scope.get("route") is None
    if not unmatched or not path.startswith("/v1/"):
        return await http_exception_handler(request, error)
    paths = request.app.openapi()["paths"]  # built once; what /openapi.json lists
    served = sorted(
        f"{method.upper()} {route}"
        for route, operations in paths.items()
        if route.startswith("/v1/")
        for method in operations
    )
    message = (
        f"Invalid URL ({request.method} {printable(path)}): not served here. "
        f"Served under /v1/: {', '.join(served)}"
    )
    return JSONResponse(
        status_code=404, content=error_body(404, message, "invalid_request_error", None)
    )
