"""uvicorn serving the HTTP app inside the service's event loop (next to grpc.aio)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import uvicorn

from teacher_service.engine import Engine
from teacher_service.web.app import create_app


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The service handles SIGINT/SIGTERM itself and stops both front ends."""
        yield


class HttpServer:
    def __init__(self, server: _Uvicorn, task: asyncio.Task, port: int, app) -> None:
        self._server, self._task, self.port, self.app = server, task, port, app

    @classmethod
    async def start(
        cls, engine: Engine, host: str, port: int, *, auth_token: str = "", tls: dict | None = None
    ) -> HttpServer:
        """`tls`: uvicorn's ssl_* keywords (auth.uvicorn_tls_options); empty serves HTTP."""
        app = create_app(engine, auth_token=auth_token)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            access_log=False,
            log_level="warning",
            **(tls or {}),
        )
        server = _Uvicorn(config)
        task = asyncio.create_task(server.serve(), name="http-server")
        while not server.started:
            if task.done():  # uvicorn exits (SystemExit) when it cannot bind
                with contextlib.suppress(BaseException):
                    task.result()
                raise OSError(f"cannot listen on {host}:{port} for HTTP (is the port in use?)")
            await asyncio.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()[1]
        return cls(server, task, bound, app)

    def mark_shutting_down(self) -> None:
        """/health answers 503 from now on, as gRPC health reports NOT_SERVING."""
        self.app.state.shutting_down = True

    async def stop(self, grace: float) -> None:
        self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
