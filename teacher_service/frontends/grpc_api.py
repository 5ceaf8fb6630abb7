"""The gRPC front end: protos in and out, the servicer, and the grpc.aio server.

The servicer is thin: it turns each proto request into the engine's plain request
(requests.py), the engine's results back into protos, and any failure into the gRPC code
that errors.STATUS gives its kind (one handler, `abort`). `start_grpc` adds the standard
health service, server reflection, auth and TLS, and `UndecodableGuard`: bytes that are
not the method's message get INVALID_ARGUMENT naming it, on every method.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from causal_lm.sampling import Completion
from teacher_client.codec import CodecError, dtype_name
from teacher_client.messages import info_to_proto
from teacher_client.proto import teacher_pb2 as pb
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_client.retry import RETRY_AFTER_KEY
from teacher_service.auth import TokenInterceptor, grpc_server_credentials
from teacher_service.codec import decode_ids, encode_torch
from teacher_service.config import ServerConfig
from teacher_service.deadlines import set_peer, set_timeout
from teacher_service.engine import Engine
from teacher_service.errors import (
    GRPC_FAILURE_CODES,
    ErrorKind,
    PeerWarnings,
    RequestError,
    ServiceError,
    classify,
    report,
)
from teacher_service.metrics import FrontEndLabels
from teacher_service.requests import (
    GenerateRequest,
    Prompt,
    ScoreRequest,
    Sequence,
)
from teacher_service.scoring import SequenceScores

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
METRIC_LABELS = FrontEndLabels(
    "grpc",
    tuple(m.name for m in pb.DESCRIPTOR.services_by_name["Teacher"].methods),
    grpc.StatusCode.OK.name,
    GRPC_FAILURE_CODES,
)
MAX_IN_FLIGHT_PER_STREAM = 64  # ScoreStream requests being worked on at once, per stream


# --- protos -> the engine's requests -----------------------------------------------------


def to_score_request(message: pb.ScoreRequest) -> ScoreRequest:
    try:
        dtype = "float32" if message.dtype == pb.DTYPE_UNSPECIFIED else dtype_name(message.dtype)
    except CodecError:
        raise RequestError(f"dtype = {message.dtype}: unknown dtype", field="dtype") from None
    sequences = [
        Sequence(
            sequence.token_ids,
            sequence.score_from,
            decode_ids(sequence.candidate_ids, f"sequences[{n}].candidate_ids")
            if sequence.HasField("candidate_ids")
            else None,
        )
        for n, sequence in enumerate(message.sequences)
    ]
    return ScoreRequest(
        sequences,
        top_k=message.top_k,
        full=message.full,
        temperature=message.temperature if message.HasField("temperature") else None,
        dtype=dtype,
    )


def to_generate_request(message: pb.GenerateRequest) -> GenerateRequest:
    def optional(name: str):
        return getattr(message, name) if message.HasField(name) else None

    return GenerateRequest(
        [Prompt(prompt.token_ids) for prompt in message.prompts],
        max_new_tokens=message.max_new_tokens,
        temperature=optional("temperature"),
        top_p=optional("top_p"),
        seed=optional("seed"),
        ignore_eos=message.ignore_eos,
    )


# --- the engine's results -> protos ------------------------------------------------------


def scores_to_proto(scores: SequenceScores) -> pb.SequenceScores:
    message = pb.SequenceScores(target_logprobs=encode_torch(scores.target_logprobs))
    for name in ("topk_ids", "topk_logprobs", "candidate_logprobs", "full_logprobs"):
        tensor = getattr(scores, name)
        if tensor is not None:
            getattr(message, name).CopyFrom(encode_torch(tensor))
    return message


def completion_to_proto(completion: Completion) -> pb.Completion:
    return pb.Completion(token_ids=completion.token_ids, finish_reason=completion.finish_reason)


# --- the servicer ------------------------------------------------------------------------


async def abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """The gRPC front end's one error handler: ends the call with the code that
    errors.STATUS gives the error's kind (context.abort raises)."""
    failure = report(error)
    if failure.retry_after is not None:  # back-pressure: when to come back, for the client
        context.set_trailing_metadata(((RETRY_AFTER_KEY, f"{failure.retry_after:.3f}"),))
    await context.abort(failure.status.grpc, failure.message)


def error_status(error: Exception) -> pb.ErrorStatus:
    """The same, as a ScoreStream response's `error` (the stream goes on); back-pressure's
    retry hint travels in the message (`retry_after_s`) instead of trailing metadata."""
    failure = report(error)
    return pb.ErrorStatus(
        code=failure.status.grpc.value[0],
        message=failure.message,
        retry_after_s=failure.retry_after,  # None leaves it unset
    )


class TeacherServicer(pb_grpc.TeacherServicer):
    """Proto calls onto the engine; failures through `abort` / `error_status`."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @contextlib.asynccontextmanager
    async def _observed(self, method: str) -> AsyncIterator[None]:
        started, status = time.perf_counter(), grpc.StatusCode.OK.name
        try:
            yield
        except Exception as error:
            status = classify(error).status.grpc.name
            raise
        except BaseException:
            status = grpc.StatusCode.CANCELLED.name
            raise
        finally:
            self._engine.metrics.observe_request(
                "grpc", method, status, time.perf_counter() - started
            )

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        async with self._observed("Info"):
            return info_to_proto(self._engine.info())

    async def _score(self, message: pb.ScoreRequest) -> pb.ScoreResponse:
        results = await self._engine.score(to_score_request(message))
        return pb.ScoreResponse(
            request_id=message.request_id, results=[scores_to_proto(r) for r in results]
        )

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        try:
            set_timeout(context.time_remaining())
            set_peer(context.peer())
            async with self._observed("Score"):
                return await self._score(request)
        except Exception as error:
            await abort(context, error)

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        """Work on up to MAX_IN_FLIGHT_PER_STREAM requests at once; answer as each finishes."""
        set_timeout(context.time_remaining())  # the stream's deadline, for each of its requests
        set_peer(context.peer())
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
                await done.put(
                    pb.ScoreStreamResponse(request_id=request.request_id, error=error_status(error))
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
            finally:
                # what was read is answered before the stream ends, also when reading failed
                # (an undecodable message: `await reader` below raises it, in this
                # generator's task, so it ends the call after the last write, not during it)
                if tasks:
                    await asyncio.wait(list(tasks))
                done.put_nowait(None)

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
            set_timeout(context.time_remaining())
            async with self._observed("Generate"):
                completions = await self._engine.generate(to_generate_request(request))
        except Exception as error:
            await abort(context, error)
        return pb.GenerateResponse(
            request_id=request.request_id,
            completions=[completion_to_proto(c) for c in completions],
        )


# --- messages that do not parse -----------------------------------------------------------


class Undecodable(NamedTuple):
    """What the guard's deserializer returns for bytes that are not the method's message."""

    message_type: str
    reason: str


MALFORMED_BODY = ErrorKind.MALFORMED_BODY


class UndecodableRequest(ServiceError):
    """A streaming call's message that did not parse, raised where it is read."""


class UndecodableGuard(grpc.aio.ServerInterceptor):
    """Every method's deserializer made tolerant: gRPC parses a request before any servicer
    runs, and a parse failure there is UNKNOWN with a logged traceback per call. Here it is
    MALFORMED_BODY (INVALID_ARGUMENT) naming the message type, logged through PeerWarnings.
    A streaming call ends at its first undecodable message (no request_id to answer it
    under): its request iterator raises UndecodableRequest, and the handler's own task
    aborts with it once the behavior lets it out. Aborting from the task that reads would
    race a response being written: grpc.aio's abort then fails (TOO_MANY_OPERATIONS, a
    logged traceback) with the call marked finished, and the client waits out its
    deadline. Health and reflection are guarded too: it wraps whatever handler is found."""

    def __init__(self, warnings: PeerWarnings | None = None) -> None:
        self.warnings = warnings or PeerWarnings()
        self._guarded: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler  # not found, or one that takes raw bytes (auth's refusal)
        if handler not in self._guarded:  # once per method, not per call
            self._guarded[handler] = self._guard(handler)
        return self._guarded[handler]

    def _guard(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        # a streaming behavior either yields its responses (an async generator: the servicer,
        # reflection) or writes them with context.write and returns (health's Watch)
        wrap = {
            (False, False): (grpc.unary_unary_rpc_method_handler, self._unary_unary),
            (False, True): (grpc.unary_stream_rpc_method_handler, self._unary_stream),
            (True, False): (grpc.stream_unary_rpc_method_handler, self._stream_unary),
            (True, True): (grpc.stream_stream_rpc_method_handler, self._stream_stream),
        }
        make, wrapper = wrap[handler.request_streaming, handler.response_streaming]
        behavior = (
            handler.stream_stream
            or handler.stream_unary
            or handler.unary_stream
            or handler.unary_unary
        )
        return make(
            wrapper(behavior),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _refuse(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Raise UndecodableRequest for an undecodable request (warned once per host)."""
        if isinstance(request, Undecodable):
            message = f"request: not a valid {request.message_type} protobuf ({request.reason})"
            self.warnings.warn(context.peer(), f"refused: {message}")
            raise UndecodableRequest(message, field="request", kind=MALFORMED_BODY)

    async def _check(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            self._refuse(request, context)
        except UndecodableRequest as error:
            await abort(context, error)

    async def _checked(self, requests: AsyncIterator, context) -> AsyncIterator:
        async for request in requests:
            self._refuse(request, context)  # raises to the reader, whichever task it is
            yield request

    def _unary_unary(self, behavior: Callable) -> Callable:
        async def call(request, context):
            await self._check(request, context)
            return await behavior(request, context)

        return call

    def _unary_stream(self, behavior: Callable) -> Callable:
        if not inspect.isasyncgenfunction(behavior):  # it writes (context.write): health Watch
            return self._unary_unary(behavior)

        async def call(request, context):
            await self._check(request, context)
            async for response in behavior(request, context):
                yield response

        return call

    def _stream_unary(self, behavior: Callable) -> Callable:
        async def call(requests, context):
            try:
                return await behavior(self._checked(requests, context), context)
            except UndecodableRequest as error:
                await abort(context, error)

        return call

    def _stream_stream(self, behavior: Callable) -> Callable:
        if not inspect.isasyncgenfunction(behavior):  # it writes (context.write)
            return self._stream_unary(behavior)

        async def call(requests, context):
            try:  # gRPC writes each response between steps of this generator, so an abort
                # here never overlaps a write
                async for response in behavior(self._checked(requests, context), context):
                    yield response
            except UndecodableRequest as error:
                await abort(context, error)

        return call


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_type = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = getattr(message_type, "full_name", "request message")

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as error:  # protobuf's DecodeError, or whatever a deserializer raises
            # protobuf words it "Error parsing message with type 'X': <reason>"
            return Undecodable(name, str(error).rpartition(": ")[2] or type(error).__name__)

    return parse


# --- the server --------------------------------------------------------------------------


async def start_grpc(
    engine: Engine, config: ServerConfig
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """The servicer, health and reflection on config.port; returns the bound port."""
    interceptors = [TokenInterceptor(config.auth_token)] if config.auth_token else []
    interceptors.append(UndecodableGuard())  # innermost: it wraps the servicers' handlers
    options = [
        ("grpc.max_receive_message_length", config.limits.max_message_bytes),
        ("grpc.max_send_message_length", config.limits.max_message_bytes),
    ]
    if config.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000)),
        ]
    # past the cap gRPC's core refuses a call before any handler runs: RESOURCE_EXHAUSTED
    # "Concurrent RPC limit exceeded!", no retry hint. Every RPC counts, a stream (ScoreStream,
    # a pooled client's health Watch) for its whole life, health checks too
    server = grpc.aio.server(
        interceptors=interceptors,
        options=options,
        maximum_concurrent_rpcs=config.grpc_max_concurrent_rpcs,
    )
    pb_grpc.add_TeacherServicer_to_server(TeacherServicer(engine), server)
    engine.metrics.expect_requests(METRIC_LABELS)
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
    address = config.address(config.port)
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
