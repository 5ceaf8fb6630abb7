"""The service's lifecycle: the engine plus the front ends the config asks for.

`start_server` wires the backend, the engine (model worker and dynamic batcher) and the
front ends (frontends/: gRPC, HTTP and verl's ZeroMQ) into one event loop; `serve` runs
it until SIGINT/SIGTERM, with start-up's heap frozen out of garbage collection (heap.py);
`BackgroundServer` runs it on a thread of its own (tests, benchmarks, notebooks). No
request handling lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import NoReturn

import grpc
from grpc_health.v1.health import aio as health_aio

from causal_lm.threads import configure_threads
from teacher_service.auth import uvicorn_tls_options
from teacher_service.backend import HFBackend
from teacher_service.backend_api import Backend
from teacher_service.config import ServerConfig
from teacher_service.engine import Engine
from teacher_service.frontends.grpc_api import SERVICE_NAME, start_grpc
from teacher_service.frontends.http.server import HttpServer
from teacher_service.frontends.zmq_api import ZmqServer
from teacher_service.heap import CollectionTimer, freeze

__all__ = [
    "SERVICE_NAME",
    "BackgroundServer",
    "RunningServer",
    "load_backend",
    "serve",
    "start_server",
]
log = logging.getLogger(__name__)
# the front ends outlive the engine by this much on shutdown, so that the calls the engine
# fails at the end of the grace are answered (UNAVAILABLE / 503) before they are cut
SHUTDOWN_MARGIN = 0.5
# serve() exits within grace + this: a forward still running then has nobody to answer
EXIT_MARGIN = 1.0


@dataclass
class RunningServer:
    engine: Engine
    grpc_server: grpc.aio.Server | None
    port: int | None  # the gRPC port (None when gRPC is off)
    health: health_aio.HealthServicer | None
    http: HttpServer | None
    zmq: ZmqServer | None = None

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    @property
    def zmq_port(self) -> int | None:
        return None if self.zmq is None else self.zmq.port

    async def drain(self, grace: float) -> None:
        """At once: NOT_SERVING, /health 503, new calls refused (UNAVAILABLE / 503). In-flight
        calls get `grace` seconds; what is still running then is answered SHUTTING_DOWN by
        the engine. HTTP and ZeroMQ close SHUTDOWN_MARGIN later: by then every call has its
        answer, so none ends in a front end's own cancellation (an HTTP 500).

        The gRPC server is left taking calls, for the closed engine to refuse (UNAVAILABLE,
        which clients retry elsewhere): grpc.aio's stop() ends every call that reached its
        core but no handler yet CANCELLED, which nobody retries (grpc/grpc#41785), and
        under load there are such calls whenever it runs. `serve` ends the process instead:
        a call then in progress sees its connection close, UNAVAILABLE."""
        self.engine.drain()
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.mark_shutting_down()
        stops = []
        if self.http is not None:
            stops.append(self.http.stop(grace + SHUTDOWN_MARGIN))
        if self.zmq is not None:  # draining: new requests get a shutting_down error reply
            stops.append(self.zmq.stop(grace + SHUTDOWN_MARGIN))
        front_ends = asyncio.gather(*stops)
        settled = asyncio.gather(front_ends, self.engine.idle())
        with contextlib.suppress(asyncio.TimeoutError):  # else every call ended in grace
            await asyncio.wait_for(asyncio.shield(settled), grace)
        await self.engine.close()
        await settled

    async def stop(self, grace: float) -> None:
        """drain(), then the gRPC server stops too (in-process servers: tests, notebooks;
        a call arriving as it stops may end CANCELLED, see drain)."""
        await self.drain(grace)
        if self.grpc_server is not None:
            await self.grpc_server.stop(SHUTDOWN_MARGIN)


async def start_server(config: ServerConfig, backend: Backend) -> RunningServer:
    """The engine plus the front ends the config asks for (gRPC, HTTP, ZeroMQ)."""
    engine = Engine(backend, config)
    engine.start()
    grpc_server = port = health = http = zmq = None
    try:
        await engine.warm_up()  # before any front end: the first request meets a measured model
        if config.grpc:
            grpc_server, port, health = await start_grpc(engine, config)
        if config.http_port is not None:
            tls = uvicorn_tls_options(config.tls_cert, config.tls_key, config.tls_client_ca)
            http = await HttpServer.start(
                engine, config.host, config.http_port, auth_token=config.auth_token, tls=tls
            )
        if config.zmq_port:
            zmq = await ZmqServer.start(engine, config.zmq_host, config.zmq_port)
    except BaseException:
        if grpc_server is not None:
            await grpc_server.stop(0)
        if http is not None:
            await http.stop(0)
        await engine.close()
        raise
    log.info(
        "teacher service: gRPC %s, HTTP %s, ZeroMQ %s (model %s, %s, auth %s, TLS %s)",
        "off" if port is None else f"{config.host}:{port}",
        "off" if http is None else f"{config.host}:{http.port}",
        "off" if zmq is None else f"{config.zmq_host}:{zmq.port} (no auth, no TLS)",
        backend.model_id,
        backend.device,
        "bearer token" if config.auth_token else "off",
        ("mutual" if config.tls_client_ca else "on") if config.tls_cert else "off",
    )
    return RunningServer(engine, grpc_server, port, health, http, zmq)


def load_backend(config: ServerConfig) -> Backend:
    """The local model, or a client of the upstream server (its tokenizer from --model)."""
    if config.backend == "huggingface":
        backend = HFBackend.load(
            config.model,
            device=config.device,
            device_map=config.device_map,
            dtype=config.dtype,
            score_chunk_mb=config.score_chunk_mb,
            share_prefixes=config.share_prefixes,
            pack=config.pack,
            deterministic=config.deterministic,
        )
        backend.rows_only = backend.rows_only and not config.full_logits
        return backend
    from teacher_service.remote import BACKENDS

    return BACKENDS[config.backend].connect(config.upstream, config.model)


def serve(config: ServerConfig, backend: Backend | None = None) -> NoReturn:
    """Run the service in the foreground until SIGINT or SIGTERM, shut down gracefully and
    end the process (within grace_seconds + EXIT_MARGIN: see _exit_within)."""
    configure_threads(config.threads)  # before the model loads: no pool has started yet
    if backend is None:
        backend = load_backend(config)

    async def main() -> None:
        running = await start_server(config, backend)
        metrics = running.engine.metrics
        collections = CollectionTimer(metrics.observe_gc_pause)
        # the process is the service's alone: what start-up built stays out of the garbage
        # collector's full passes, each of which would stop every thread (heap.py)
        if config.freeze_heap:
            metrics.gc_frozen.set(frozen := freeze())
            log.info("%d objects frozen out of garbage collection", frozen)
        if running.port is not None:
            print(
                f"teacher-service listening on {config.address(running.port)} (gRPC)",
                flush=True,
            )
        if running.http_port is not None:
            http_address = config.address(running.http_port)
            print(
                f"teacher-service listening on http://{http_address} (HTTP, docs at /docs)",
                flush=True,
            )
        if running.zmq_port is not None:
            zmq_address = f"tcp://{config.zmq_host}:{running.zmq_port}"
            print(
                f"teacher-service listening on {zmq_address} (ZeroMQ, verl's GKD teacher "
                "protocol; no auth, no TLS)",
                flush=True,
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        signalled = time.monotonic()
        log.info("shutting down (grace %.1fs)", config.grace_seconds)
        await running.drain(config.grace_seconds)
        await asyncio.sleep(SHUTDOWN_MARGIN)  # the last gRPC answers reach the wire
        collections.close()
        await _exit_within(running.engine, signalled, config.grace_seconds)

    asyncio.run(main())
    raise AssertionError("unreachable: _exit_within ends the process")


async def _exit_within(engine: Engine, since: float, grace: float) -> NoReturn:
    """End the process once the model worker is idle, and at the latest grace + EXIT_MARGIN
    after the signal. Every call has its answer by now; what is left is a forward that
    nobody waits for and the interpreter's teardown (gRPC's core, torch: seconds under
    load), neither worth overrunning the grace an orchestrator gave this process. The
    event loop runs meanwhile, so a call arriving now is refused by the closed engine
    (UNAVAILABLE), and one in progress at the exit sees its connection close (UNAVAILABLE)."""
    left = since + grace + EXIT_MARGIN - 0.2 - time.monotonic()
    if not await asyncio.to_thread(engine.worker.join, max(0.0, left)):
        log.warning("exiting while a forward is still running (its callers were answered)")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class BackgroundServer:
    """The service on a thread of its own, with its own event loop; a context manager."""

    def __init__(self, config: ServerConfig, backend: Backend) -> None:
        self._config = config
        self._backend = backend
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="teacher-server", daemon=True
        )
        self.running: RunningServer | None = None
        self.started_at: float | None = None  # time.monotonic() when it began serving

    @property
    def address(self) -> str:
        """host:port of the gRPC front end."""
        assert self.running is not None and self.running.port is not None, "no gRPC server"
        return self._config.address(self.running.port)

    @property
    def http_url(self) -> str:
        """http(s)://host:port of the HTTP front end."""
        assert self.running is not None and self.running.http_port is not None, "no HTTP server"
        scheme = "https" if self._config.tls_cert else "http"
        return f"{scheme}://{self._config.address(self.running.http_port)}"

    @property
    def zmq_url(self) -> str:
        """tcp://host:port of the ZeroMQ front end (verl's GKD teacher protocol)."""
        assert self.running is not None and self.running.zmq_port is not None, "no ZeroMQ"
        host = self._config.zmq_host
        return f"tcp://{f'[{host}]' if ':' in host else host}:{self.running.zmq_port}"

    def call(self, coroutine):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def start(self) -> BackgroundServer:
        self._thread.start()
        self.running = self.call(start_server(self._config, self._backend))
        self.started_at = time.monotonic()
        return self

    def stop(self) -> None:
        if self.running is not None:
            self.call(self.running.stop(self._config.grace_seconds))
            self.running.engine.worker.join()  # the model is free for whoever uses it next
            self.running = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        with contextlib.suppress(RuntimeError):
            self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
