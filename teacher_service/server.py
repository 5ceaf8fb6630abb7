"""The gRPC front end: validate, enqueue, map errors. No model code lives here.

`start_server` wires the backend, the model worker, the dynamic batcher, the Teacher
servicer, the standard health service and server reflection into one grpc.aio server;
`serve` runs it until SIGINT/SIGTERM; `BackgroundServer` runs it on a thread of its own
(tests, benchmarks, notebooks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from teacher_client.proto import teacher_pb2 as pb
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_service.auth import TokenInterceptor, grpc_server_credentials, uvicorn_tls_options
from teacher_service.backend import HFBackend
from teacher_service.batcher import BatcherClosed, BatcherOverloaded
from teacher_service.codec import encode_torch
from teacher_service.config import ServerConfig
from teacher_service.engine import Engine, Unsupported
from teacher_service.scoring import SequenceScores
from teacher_service.validation import RequestError
from teacher_service.web.server import HttpServer

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
MAX_IN_FLIGHT_PER_STREAM = 64  # ScoreStream requests being worked on at once, per stream


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a failure is reported with (the message names what went wrong)."""
    if isinstance(error, Unsupported):
        return grpc.StatusCode.UNIMPLEMENTED, str(error)
    if isinstance(error, RequestError):
        code = (
            grpc.StatusCode.RESOURCE_EXHAUSTED
            if error.too_large
            else grpc.StatusCode.INVALID_ARGUMENT
        )
        return code, str(error)
    if isinstance(error, BatcherOverloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, BatcherClosed):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, torch.OutOfMemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"the teacher ran out of memory: {error}"
    log.error("request failed", exc_info=error)
    return (
        grpc.StatusCode.INTERNAL,
        f"the teacher failed on this request: {type(error).__name__}: {error}",
    )


def scores_to_proto(scores: SequenceScores) -> pb.SequenceScores:
    message = pb.SequenceScores(target_logprobs=encode_torch(scores.target_logprobs))
    for name in ("topk_ids", "topk_logprobs", "candidate_logprobs", "full_logprobs"):
        tensor = getattr(scores, name)
        if tensor is not None:
            getattr(message, name).CopyFrom(encode_torch(tensor))
    return message


class TeacherServicer(pb_grpc.TeacherServicer):
    """Maps the proto calls onto the engine and its errors onto gRPC status codes."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @contextlib.asynccontextmanager
    async def _observed(self, method: str) -> AsyncIterator[None]:
        started, status = time.perf_counter(), "OK"
        try:
            yield
        except BaseException as error:
            status = status_for(error)[0].name if isinstance(error, Exception) else "CANCELLED"
            raise
        finally:
            self._engine.metrics.observe_request(
                "grpc", method, status, time.perf_counter() - started
            )

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        async with self._observed("Info"):
            return self._engine.info()

    async def _score(self, request: pb.ScoreRequest) -> pb.ScoreResponse:
        results = await self._engine.score(request)
        return pb.ScoreResponse(
            request_id=request.request_id, results=[scores_to_proto(r) for r in results]
        )

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        try:
            async with self._observed("Score"):
                return await self._score(request)
        except Exception as error:
            await context.abort(*status_for(error))

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        """Work on up to MAX_IN_FLIGHT_PER_STREAM requests at once; answer as each finishes."""
        done: asyncio.Queue[pb.ScoreStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(MAX_IN_FLIGHT_PER_STREAM)
        tasks: set[asyncio.Task] = set()

        async def answer(request: pb.ScoreRequest) -> None:
            try:
                async with self._observed("ScoreStream"):
                    response = await self._score(request)
                await done.put(
                    pb.ScoreStreamResponse(request_id=request.request_id, response=response)
                )
            except Exception as error:
                code, message = status_for(error)
                await done.put(
                    pb.ScoreStreamResponse(
                        request_id=request.request_id,
                        error=pb.ErrorStatus(code=code.value[0], message=message),
                    )
                )
            finally:
                slots.release()

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.gather(*list(tasks))
            finally:
                done.put_nowait(None)  # ends the response loop even if reading failed

        reader = asyncio.create_task(read_all())
        try:
            while (response := await done.get()) is not None:
                yield response
            await reader
        finally:
            for task in [reader, *tasks]:
                task.cancel()

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        try:
            async with self._observed("Generate"):
                completions = await self._engine.generate(request)
        except Exception as error:
            await context.abort(*status_for(error))
        return pb.GenerateResponse(
            request_id=request.request_id,
            completions=[
                pb.Completion(token_ids=c.token_ids, finish_reason=c.finish_reason)
                for c in completions
            ],
        )


@dataclass
class RunningServer:
    engine: Engine
    grpc_server: grpc.aio.Server | None
    port: int | None  # the gRPC port (None when gRPC is off)
    health: health_aio.HealthServicer | None
    http: HttpServer | None

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, let in-flight calls finish for `grace` seconds, then stop."""
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.mark_shutting_down()
        stops = []
        if self.grpc_server is not None:
            stops.append(self.grpc_server.stop(grace))
        if self.http is not None:
            stops.append(self.http.stop(grace))
        await asyncio.gather(*stops)
        await self.engine.close()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def _start_grpc(
    engine: Engine, config: ServerConfig
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    interceptors = [TokenInterceptor(config.auth_token)] if config.auth_token else []
    options = [
        ("grpc.max_receive_message_length", config.limits.max_message_bytes),
        ("grpc.max_send_message_length", config.limits.max_message_bytes),
    ]
    if config.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000)),
        ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    pb_grpc.add_TeacherServicer_to_server(TeacherServicer(engine), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    address = _address(config.host, config.port)
    try:
        if config.tls_cert:
            credentials = grpc_server_credentials(
                config.tls_cert, config.tls_key, config.tls_client_ca
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as error:
        raise OSError(f"cannot listen on {address}: {error} (is the port in use?)") from None
    await server.start()
    return server, port, health


async def start_server(config: ServerConfig, backend) -> RunningServer:
    """The engine plus the front ends the config asks for (gRPC, HTTP or both)."""
    engine = Engine(backend, config)
    engine.start()
    grpc_server = port = health = http = None
    try:
        if config.grpc:
            grpc_server, port, health = await _start_grpc(engine, config)
        if config.http_port is not None:
            tls = uvicorn_tls_options(config.tls_cert, config.tls_key, config.tls_client_ca)
            http = await HttpServer.start(
                engine, config.host, config.http_port, auth_token=config.auth_token, tls=tls
            )
    except BaseException:
        if grpc_server is not None:
            await grpc_server.stop(0)
        await engine.close()
        raise
    log.info(
        "teacher service: gRPC %s, HTTP %s (model %s, %s, auth %s, TLS %s)",
        "off" if port is None else f"{config.host}:{port}",
        "off" if http is None else f"{config.host}:{http.port}",
        backend.model_id,
        backend.device,
        "bearer token" if config.auth_token else "off",
        ("mutual" if config.tls_client_ca else "on") if config.tls_cert else "off",
    )
    return RunningServer(engine, grpc_server, port, health, http)


def load_backend(config: ServerConfig):
    """The local model, or a client of the upstream server (its tokenizer from --model)."""
    if config.backend == "huggingface":
        return HFBackend.load(config.model, device=config.device, dtype=config.dtype)
    from teacher_service.remote import BACKENDS

    return BACKENDS[config.backend].connect(config.upstream, config.model)


def serve(config: ServerConfig, backend: HFBackend | None = None) -> None:
    """Run the service in the foreground until SIGINT or SIGTERM, then shut down gracefully."""
    if backend is None:
        backend = load_backend(config)

    async def main() -> None:
        running = await start_server(config, backend)
        if running.port is not None:
            print(
                f"teacher-service listening on {_address(config.host, running.port)} (gRPC)",
                flush=True,
            )
        if running.http_port is not None:
            http_address = _address(config.host, running.http_port)
            print(
                f"teacher-service listening on http://{http_address} (HTTP, docs at /docs)",
                flush=True,
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down (grace %.1fs)", config.grace_seconds)
        await running.stop(config.grace_seconds)

    asyncio.run(main())


class BackgroundServer:
    """The service on a thread of its own, with its own event loop; a context manager."""

    def __init__(self, config: ServerConfig, backend: HFBackend) -> None:
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
        return _address(self._config.host, self.running.port)

    @property
    def http_url(self) -> str:
        """http(s)://host:port of the HTTP front end."""
        assert self.running is not None and self.running.http_port is not None, "no HTTP server"
        scheme = "https" if self._config.tls_cert else "http"
        return f"{scheme}://{_address(self._config.host, self.running.http_port)}"

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
            self.running = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        with contextlib.suppress(RuntimeError):
            self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
