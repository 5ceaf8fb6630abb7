"""The FastAPI app: every dialect's router, /health, /metrics and request metrics.

A bad request gets a 4xx whose JSON body names the field; a request error never becomes a
500. Statuses come from errors.STATUS (web/errors.py applies it): 422 invalid, 400
malformed body, 413 too large, 429 overloaded (with Retry-After), 503 shutting down, 504
deadline exceeded (the caller's `X-Request-Timeout`), 507 out of memory.
"""

from __future__ import annotations

import time
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from teacher_service import __version__
from teacher_service.auth import HTTP_OPEN_PATHS, REFUSED, bearer_matches
from teacher_service.deadlines import TIMEOUT_HEADER, set_peer, set_timeout_header
from teacher_service.engine import Engine
from teacher_service.errors import HTTP_FAILURE_CODES
from teacher_service.frontends.http import (
    dashboard,
    native,
    openai,
    openai_chat,
    openai_errors,
    tgi,
)
from teacher_service.metrics import FrontEndLabels


def create_app(engine: Engine, *, auth_token: str = "") -> FastAPI:
    app = FastAPI(
        title="teacher-service",
        version=__version__,
        description="A teacher model's per-token log-probabilities for on-policy distillation. "
        "Native API (JSON or msgpack), the vLLM/OpenAI completions dialect and the TGI "
        "dialect, all on one dynamic batcher shared with the gRPC front end.",
    )
    app.state.engine = engine
    app.state.shutting_down = False

    if auth_token:
        open_paths = HTTP_OPEN_PATHS | dashboard.PAGE_PATHS  # the page holds no data

        @app.middleware("http")
        async def authenticate(request: Request, call_next):
            """Runs before the body is read: a refused request never reaches the engine."""
            if request.url.path in open_paths or bearer_matches(
                request.headers.get("authorization"), auth_token
            ):
                return await call_next(request)
            return JSONResponse(
                status_code=401,
                content={"error": REFUSED},
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.middleware("http")
    async def observe(request: Request, call_next):
        """Request metrics; and the caller's X-Request-Timeout and address, for the engine."""
        started = time.perf_counter()
        set_timeout_header(request.headers.get(TIMEOUT_HEADER))
        client = request.client
        set_peer(None if client is None else f"{client.host}:{client.port}")
        response = await call_next(request)
        route = request.scope.get("route")
        method = getattr(route, "path", "unmatched")
        engine.metrics.observe_request(
            "http",
            f"{request.method} {method}",
            str(response.status_code),
            time.perf_counter() - started,
        )
        return response

    @app.get("/health", tags=["service"])
    async def health() -> Response:
        """200 while serving, 503 once shutting down (for load balancers and probes)."""
        return Response(status_code=503 if app.state.shutting_down else 200)

    @app.get("/metrics", tags=["service"])
    async def metrics() -> Response:
        """Prometheus metrics: requests, errors, tokens scored, batches, queue, latencies."""
        return Response(engine.metrics.render(), media_type=engine.metrics.content_type)

    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(openai_chat.router)
    app.add_exception_handler(404, openai_errors.unknown_route)
    app.include_router(tgi.router)
    app.include_router(dashboard.router)
    engine.metrics.expect_requests(metric_labels(app))
    return app


def metric_labels(app: FastAPI) -> FrontEndLabels:
    """The front end's methods as `observe` names them ("POST /v1/score"): every operation
    of the app's OpenAPI schema, so each starts at 0 in the request metrics."""
    paths = app.openapi()["paths"]
    methods = tuple(f"{verb.upper()} {path}" for path, verbs in paths.items() for verb in verbs)
    return FrontEndLabels("http", methods, str(HTTPStatus.OK.value), HTTP_FAILURE_CODES)
