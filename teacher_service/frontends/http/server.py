"""uvicorn serving the HTTP app inside the service's event loop (next to grpc.aio), with
the connection hygiene uvicorn lacks: read deadlines (GuardedH11Protocol) and a cap on
open connections (uvicorn's limit_concurrency)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from teacher_service.engine import Engine
from teacher_service.errors import PeerWarnings
from teacher_service.frontends.http.app import create_app

log = logging.getLogger(__name__)


class _PeerLogger:
    """uvicorn's logger for one connection, its warnings (one per malformed request line,
    one per request past the connection cap) through PeerWarnings: no log flood."""

    def __init__(self, logger: logging.Logger, warnings: PeerWarnings, peer: str) -> None:
        self._logger, self._warnings, self._peer = logger, warnings, peer

    def warning(self, message: str, *args: Any) -> None:
        self._warnings.warn(self._peer, message % args if args else message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus read deadlines. uvicorn (0.54) times out only an idle
    keep-alive connection, after a response: a client that connects and sends nothing, or
    trickles its headers or body a byte at a time, holds its connection for ever (and
    counts against the connection cap). Here a request's line and headers must arrive
    within `header_timeout` of the connection opening or of the request's first byte, and
    its body within `body_timeout` of the headers: total deadlines, so trickling does not
    extend them. Past one, a client with a request under way and no answer yet gets 408,
    and the connection is closed. Nothing is timed while the app works on a whole request."""

    def __init__(
        self, *args: Any, header_timeout: float, body_timeout: float, warnings: PeerWarnings,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self._timeouts = {"headers": header_timeout, "body": body_timeout}
        self._warnings = warnings
        self._phase: str | None = None  # what the client owes: "headers", "body" or nothing
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else "unknown"
        self.logger = _PeerLogger(self.logger, self._warnings, host)  # type: ignore[assignment]
        self._enter("headers")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow(received=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow(received=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter(None)
        super().connection_lost(exc)

    def _follow(self, received: bool) -> None:
        """The phase h11's view of the client implies; a deadline runs on from its start."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._enter("body")
        elif state is h11.IDLE and (received or self.conn.trailing_data[0]):
            self._enter("headers")  # part of a request line or headers is in
        elif state is not h11.IDLE or self._phase != "headers":
            self._enter(None)  # a whole request in (the app's turn), closing, or keep-alive

    def _enter(self, phase: str | None) -> None:
        if phase == self._phase:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None and not self.transport.is_closing():
            self._deadline = self.loop.call_later(self._timeouts[phase], self._expire)

    def _expire(self) -> None:
        phase, self._deadline = self._phase, None
        if self.transport.is_closing():
            return
        if phase == "headers":
            under_way = bool(self.conn.trailing_data[0])  # some of a request is in
        else:
            under_way = not self.cycle.response_started
            self.cycle.disconnected = True  # the app's next receive() is http.disconnect
        if under_way:
            what = "request line and headers" if phase == "headers" else "request body"
            text = f"the {what} did not arrive within {self._timeouts[phase]:g} s".encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(text), text)
            )
        log.debug("closing %s: %s not received in time", self.client, phase)
        self.transport.close()


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
        settings = engine.config
        protocol = functools.partial(  # uvicorn calls it as it would the class
            GuardedH11Protocol,
            header_timeout=settings.http_header_timeout_s,
            body_timeout=settings.http_body_timeout_s,
            warnings=PeerWarnings(),
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http=protocol,  # type: ignore[arg-type]
            # uvicorn answers 503 once the open connections (this one included) or the
            # running requests reach the limit: + 1 serves exactly the cap
            limit_concurrency=settings.http_max_connections + 1,
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
