"""The client library trainers use: TeacherClient (blocking) and AsyncTeacherClient (asyncio).

    client = TeacherClient("localhost:50051")
    client.check_tokenizer(tokenizer)          # refuses a teacher that means other tokens
    results = client.score(sequences, score_from, ScoreOptions(top_k=64))
    results[0].topk_logprobs                   # numpy [T, 64]

Every call has a deadline (`timeout`, per call or the client's default) that covers its
retries: UNAVAILABLE (server restarting, connection lost) is retried with exponential
backoff and jitter, and an overloaded server's refusal (RESOURCE_EXHAUSTED with a
`retry-after` hint) after the hint; every other error raises TeacherServiceError at once,
with the server's message naming the offending field. The deadline also travels with the
call, so the server drops work whose caller has stopped waiting. While calls wait out an
outage, the `teacher_client` logger says so (a WARNING every 10 s at most, and one when
the service is back: retry.OutageLog).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from teacher_client.auth import TOKEN_ENV, bearer_metadata, grpc_channel_credentials
from teacher_client.messages import (
    GenerateResult,
    ScoreOptions,
    ScoreResult,
    TeacherInfo,
    build_generate_request,
    build_score_request,
    compare_tokenizer,
    merge_score_options,
    parse_generate_response,
    parse_info,
    parse_score_response,
)
from teacher_client.pipeline import DONE, Pipeline, StreamRefused, Wait
from teacher_client.pool import POOL_SERVICE_CONFIG, channel_options, channel_target
from teacher_client.proto import teacher_pb2 as pb
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_client.retry import DEFAULT_RETRY, OutageLog, RetryPolicy

DEFAULT_TIMEOUT = 120.0
MAX_MESSAGE_BYTES = 1024 * 1024 * 1024


class TeacherServiceError(RuntimeError):
    """A call the teacher service refused or could not complete. `retry_after`: seconds
    after which an overloaded server expects room (its back-pressure hint), else None."""

    def __init__(
        self,
        method: str,
        code: grpc.StatusCode,
        details: str,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{method} failed with {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details
        self.retry_after = retry_after


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _error(method: str, error: grpc.RpcError) -> TeacherServiceError:
    return TeacherServiceError(method, error.code(), error.details() or "")


def _stream_error(failed: StreamRefused) -> TeacherServiceError:
    return TeacherServiceError(
        "ScoreStream", failed.code, failed.message, retry_after=failed.retry_after
    )


class _Tries:
    """One call's tries, for both flavours' retry loops: its deadline, the retries so far,
    and what they tell the client's OutageLog."""

    def __init__(self, client: _ClientBase, method: str, timeout: float | None) -> None:
        self.client, self.method = client, method
        self.deadline = client._deadline(timeout)
        self.retries = 0  # UNAVAILABLE ones (RetryPolicy.counts_as_attempt)
        self.waited = False  # for the service to come back (not for back-pressure)

    def remaining(self) -> float | None:
        return _remaining(self.deadline)

    def failed(self, error: grpc.RpcError) -> float:
        """Seconds to wait before trying again; TeacherServiceError when it is not retried."""
        retry = self.client.retry
        delay = retry.next_delay(error, self.retries, self.deadline)
        if delay is None:
            raise _error(self.method, error) from None
        self.waited |= self.client.outage.retrying(error, delay, self.deadline)
        self.retries += retry.counts_as_attempt(error)
        return delay

    def succeeded(self) -> None:
        if self.waited:
            self.client.outage.back()


class _ClientBase:
    """What both flavours share: target, default deadline, retry policy, one channel."""

    _grpc: Any  # the grpc module (blocking) or grpc.aio: where the channel factories live

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
    ) -> None:
        """`target`: host:port, or a pool of replicas (a list or "a:1,b:2" of host:port, or
        dns:///name:port); calls go round-robin to the healthy ones, and a call that fails
        with UNAVAILABLE (a replica died) is retried on another, with the same result.
        `token`: the service's bearer token (default: $TEACHER_AUTH_TOKEN, if set).
        TLS is on with `tls` or any tls_* file: the server is verified against `tls_ca`
        (system roots if none), and tls_cert/tls_key are presented for mutual TLS."""
        self.target, pool = channel_target(target)
        self._metadata = bearer_metadata(token if token is not None else os.environ.get(TOKEN_ENV))
        self.timeout = timeout
        self.retry = retry
        self.outage = OutageLog(self.target)
        options = channel_options(max_message_bytes, retry)
        if pool:
            options.append(("grpc.service_config", POOL_SERVICE_CONFIG))
        if tls or tls_ca or tls_cert:
            credentials = grpc_channel_credentials(tls_ca, tls_cert, tls_key)
            self._channel = self._grpc.secure_channel(self.target, credentials, options=options)
        else:
            self._channel = self._grpc.insecure_channel(self.target, options=options)
        self._stub = pb_grpc.TeacherStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _deadline(self, timeout: float | None) -> float | None:
        """The call's own timeout, else the client's default, as a monotonic deadline."""
        return _deadline(self.timeout if timeout is None else timeout)


class TeacherClient(_ClientBase):
    """Blocking client; thread-safe (one HTTP/2 connection shared by all threads)."""

    _grpc = grpc

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        call, tries = getattr(self._stub, method), _Tries(self, method, timeout)
        while True:
            try:
                response = call(request, timeout=tries.remaining(), metadata=self._metadata)
            except grpc.RpcError as error:
                time.sleep(tries.failed(error))
            else:
                tries.succeeded()
                return response

    def info(self, *, timeout: float | None = None) -> TeacherInfo:
        return parse_info(self._call("Info", pb.InfoRequest(), timeout))

    def score(
        self,
        sequences: Sequence[Any],
        score_from: int | Sequence[int],
        options: ScoreOptions | None = None,
        *,
        candidates: Any = None,
        timeout: float | None = None,
        **option_fields: Any,
    ) -> list[ScoreResult]:
        """Teacher log-probs for each sequence from position score_from on (docs/design.md).

        What is asked for is `options` (default ScoreOptions()), with any ScoreOptions field
        given by name replacing its own: `score(seqs, 1, top_k=8, full=True)` is
        `score(seqs, 1, ScoreOptions(top_k=8, full=True))`. `candidates`: the student's own
        ids, None, one list shared by every sequence and row, or one entry per sequence.
        """
        options = merge_score_options(options, option_fields)
        request = build_score_request(sequences, score_from, options, candidates=candidates)
        return parse_score_response(self._call("Score", request, timeout))

    def score_stream(
        self, calls: Iterable[dict[str, Any]], *, window: int = 8, timeout: float | None = None
    ) -> Iterator[list[ScoreResult]]:
        """Pipeline many score calls over one ScoreStream; yields their results in order.

        Each call is a dict of `score` keyword arguments (sequences, score_from, and options
        and candidates, or ScoreOptions fields by name: top_k, ...).
        At most `window` requests are in flight. `timeout` bounds the whole stream. A
        request the server refuses for back-pressure is sent again after its hint, before
        anything after it (pipeline.py), within the stream's deadline; a request that fails
        otherwise, or whose hint would pass the deadline, raises TeacherServiceError when
        its turn comes, and the stream ends.
        """
        deadline = self._deadline(timeout)
        pipeline = Pipeline(calls, window, deadline)
        changed = threading.Condition()
        closed = False

        def requests() -> Iterator[pb.ScoreRequest]:  # on gRPC's thread
            while True:
                with changed:
                    if closed:
                        return
                    step = pipeline.next_request()
                    if step is DONE:
                        return
                    if isinstance(step, Wait):  # woken by an answer, the hint, or closing
                        changed.wait(step.seconds)
                        continue
                yield step

        stream = self._stub.ScoreStream(
            requests(), timeout=_remaining(deadline), metadata=self._metadata
        )
        try:
            for response in stream:
                with changed:
                    pipeline.answered(response)
                    changed.notify_all()
                    results, failed = pipeline.take_ready()
                yield from results
                if failed is not None:
                    raise _stream_error(failed)
        except grpc.RpcError as error:
            raise _error("ScoreStream", error) from None
        finally:
            with changed:
                closed = True
                changed.notify_all()
            stream.cancel()

    def generate(
        self,
        prompts: Sequence[Any],
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_at_eos: bool = True,
        timeout: float | None = None,
    ) -> list[GenerateResult]:
        """Complete each prompt (token ids); temperature 0 is greedy. Same seed, same output."""
        request = build_generate_request(
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_at_eos=stop_at_eos,
        )
        return parse_generate_response(self._call("Generate", request, timeout))

    def check_tokenizer(self, tokenizer: Any) -> TeacherInfo:
        """The handshake: raise TokenizerMismatchError unless `tokenizer` is the teacher's."""
        info = self.info()
        compare_tokenizer(info, tokenizer)
        return info

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Block until the health service reports SERVING (the server may still be starting)."""
        deadline = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service="")
        while True:
            try:
                status = self._health.Check(request, timeout=max(0.1, _remaining(deadline)))
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                if time.monotonic() >= deadline:
                    raise _error("Health.Check", error) from None
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.target} did not report SERVING within {timeout}s")
            time.sleep(0.1)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class AsyncTeacherClient(_ClientBase):
    """asyncio client: the calls of TeacherClient, as coroutines, with the same keywords.

    Concurrent calls are multiplexed over one connection, so `asyncio.gather` of many
    `score` calls pipelines them.
    """

    _grpc = grpc.aio

    async def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        call, tries = getattr(self._stub, method), _Tries(self, method, timeout)
        while True:
            try:
                response = await call(request, timeout=tries.remaining(), metadata=self._metadata)
            except grpc.aio.AioRpcError as error:
                await asyncio.sleep(tries.failed(error))
            else:
                tries.succeeded()
                return response

    async def info(self, *, timeout: float | None = None) -> TeacherInfo:
        return parse_info(await self._call("Info", pb.InfoRequest(), timeout))

    async def score(
        self,
        sequences: Sequence[Any],
        score_from: int | Sequence[int],
        options: ScoreOptions | None = None,
        *,
        candidates: Any = None,
        timeout: float | None = None,
        **option_fields: Any,
    ) -> list[ScoreResult]:
        """TeacherClient.score: a ScoreOptions, ScoreOptions fields by name, or both."""
        options = merge_score_options(options, option_fields)
        request = build_score_request(sequences, score_from, options, candidates=candidates)
        return parse_score_response(await self._call("Score", request, timeout))

    async def score_stream(
        self, calls: Iterable[dict[str, Any]], *, window: int = 8, timeout: float | None = None
    ) -> AsyncIterator[list[ScoreResult]]:
        """TeacherClient.score_stream as an async generator: `async for results in ...`."""
        deadline = self._deadline(timeout)
        pipeline = Pipeline(calls, window, deadline)
        changed = asyncio.Event()

        async def requests() -> AsyncIterator[pb.ScoreRequest]:
            while True:
                step = pipeline.next_request()
                if step is DONE:
                    return
                if isinstance(step, Wait):  # woken by an answer or the hint
                    changed.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(changed.wait(), step.seconds)
                    continue
                yield step

        stream = self._stub.ScoreStream(
            requests(), timeout=_remaining(deadline), metadata=self._metadata
        )
        try:
            async for response in stream:
                pipeline.answered(response)
                changed.set()
                results, failed = pipeline.take_ready()
                for result in results:
                    yield result
                if failed is not None:
                    raise _stream_error(failed)
        except grpc.aio.AioRpcError as error:
            raise _error("ScoreStream", error) from None
        finally:
            stream.cancel()

    async def generate(
        self, prompts: Sequence[Any], *, timeout: float | None = None, **options: Any
    ) -> list[GenerateResult]:
        """TeacherClient.generate: options max_new_tokens, temperature, top_p, seed, stop_at_eos."""
        request = build_generate_request(prompts, **options)
        return parse_generate_response(await self._call("Generate", request, timeout))

    async def check_tokenizer(self, tokenizer: Any) -> TeacherInfo:
        info = await self.info()
        compare_tokenizer(info, tokenizer)
        return info

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncTeacherClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
