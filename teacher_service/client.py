"""The client library trainers use: TeacherClient (blocking) and AsyncTeacherClient (asyncio).

    client = TeacherClient("localhost:50051")
    client.check_tokenizer(tokenizer)          # refuses a teacher that means other tokens
    results = client.score(sequences, score_from, top_k=64)
    results[0].topk_logprobs                   # numpy [T, 64]

Every call has a deadline (`timeout`, per call or the client's default) that covers its
retries: UNAVAILABLE (server restarting, connection lost) is retried with exponential
backoff and jitter; every other error raises TeacherServiceError at once, with the
server's message naming the offending field.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from teacher_service.auth import TOKEN_ENV, bearer_metadata, grpc_channel_credentials
from teacher_service.codec import LOGPROB_DTYPES, decode_numpy, dtype_enum, encode_numpy
from teacher_service.fingerprint import tokenizer_fingerprint
from teacher_service.proto import teacher_pb2 as pb
from teacher_service.proto import teacher_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT = 120.0
MAX_MESSAGE_BYTES = 1024 * 1024 * 1024


class TeacherServiceError(RuntimeError):
    """A call the teacher service refused or could not complete."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method} failed with {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


class TokenizerMismatchError(ValueError):
    """The trainer's tokenizer assigns ids differently from the teacher's."""


@dataclass(frozen=True)
class TeacherInfo:
    model_id: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_seq_len: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    backend: str
    device: str
    model_dtype: str
    max_batch_tokens: int
    max_tokens_per_request: int
    max_sequences_per_request: int
    max_message_bytes: int
    capabilities: tuple[str, ...]
    server_version: str


@dataclass
class ScoreResult:
    """One sequence's teacher signal; row j is position score_from + j."""

    target_logprobs: np.ndarray  # [T]
    topk_ids: np.ndarray | None  # [T, k] int32
    topk_logprobs: np.ndarray | None  # [T, k]
    candidate_logprobs: np.ndarray | None  # [T, m]
    full_logprobs: np.ndarray | None  # [T, V]


@dataclass
class GenerateResult:
    token_ids: list[int]  # new tokens only; ends with the eos when finish_reason == "eos"
    finish_reason: str  # "eos" or "length"


# --- messages: pure functions shared by both clients ---------------------------------------


def _ids(values: Any, what: str) -> list[int]:
    array = np.asarray(values)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{what}: expected a 1-D sequence of integer token ids")
    return array.astype(np.int64).tolist()


def _per_sequence_candidates(candidates: Any, count: int) -> list[Any]:
    """None, one id list shared by every sequence and row, or one entry per sequence."""
    if candidates is None:
        return [None] * count
    per_sequence = (
        isinstance(candidates, (list, tuple))
        and len(candidates) == count
        and all(c is None or np.ndim(c) >= 1 for c in candidates)
    )
    return list(candidates) if per_sequence else [candidates] * count


def build_score_request(
    sequences: Sequence[Any],
    score_from: int | Sequence[int],
    *,
    top_k: int = 64,
    candidates: Any = None,
    full: bool = False,
    temperature: float = 1.0,
    dtype: str = "float32",
    request_id: str = "",
) -> pb.ScoreRequest:
    if dtype not in LOGPROB_DTYPES:
        raise ValueError(f"dtype = {dtype!r}: expected one of {LOGPROB_DTYPES}")
    starts = [score_from] * len(sequences) if isinstance(score_from, int) else list(score_from)
    if len(starts) != len(sequences):
        raise ValueError(f"score_from: {len(starts)} values for {len(sequences)} sequences")
    request = pb.ScoreRequest(
        top_k=top_k,
        full=full,
        temperature=temperature,
        dtype=dtype_enum(dtype),
        request_id=request_id,
    )
    for n, (tokens, start, cands) in enumerate(
        zip(sequences, starts, _per_sequence_candidates(candidates, len(sequences)))
    ):
        sequence = request.sequences.add(
            token_ids=_ids(tokens, f"sequences[{n}]"), score_from=start
        )
        if cands is not None:
            sequence.candidate_ids.CopyFrom(encode_numpy(np.asarray(cands), "int32"))
    return request


def parse_score_response(response: pb.ScoreResponse) -> list[ScoreResult]:
    def get(message: pb.SequenceScores, name: str) -> np.ndarray | None:
        return decode_numpy(getattr(message, name)) if message.HasField(name) else None

    return [
        ScoreResult(
            target_logprobs=decode_numpy(r.target_logprobs),
            topk_ids=get(r, "topk_ids"),
            topk_logprobs=get(r, "topk_logprobs"),
            candidate_logprobs=get(r, "candidate_logprobs"),
            full_logprobs=get(r, "full_logprobs"),
        )
        for r in response.results
    ]


def build_generate_request(
    prompts: Sequence[Any],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
    request_id: str = "",
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompts=[pb.Prompt(token_ids=_ids(p, f"prompts[{n}]")) for n, p in enumerate(prompts)],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        ignore_eos=not stop_at_eos,
        request_id=request_id,
    )


def parse_generate_response(response: pb.GenerateResponse) -> list[GenerateResult]:
    return [GenerateResult(list(c.token_ids), c.finish_reason) for c in response.completions]


def parse_info(response: pb.InfoResponse) -> TeacherInfo:
    def maybe(token_id: int) -> int | None:
        return None if token_id < 0 else token_id

    return TeacherInfo(
        model_id=response.model_id,
        vocab_size=response.vocab_size,
        tokenizer_fingerprint=response.tokenizer_fingerprint,
        max_seq_len=response.max_seq_len,
        bos_token_id=maybe(response.bos_token_id),
        eos_token_id=maybe(response.eos_token_id),
        pad_token_id=maybe(response.pad_token_id),
        backend=response.backend,
        device=response.device,
        model_dtype=response.model_dtype,
        max_batch_tokens=response.max_batch_tokens,
        max_tokens_per_request=response.max_tokens_per_request,
        max_sequences_per_request=response.max_sequences_per_request,
        max_message_bytes=response.max_message_bytes,
        capabilities=tuple(response.capabilities),
        server_version=response.server_version,
    )


def compare_tokenizer(info: TeacherInfo, tokenizer: Any) -> None:
    """Raise TokenizerMismatchError, saying how they differ, unless the fingerprints agree."""
    local = tokenizer_fingerprint(tokenizer)
    if local == info.tokenizer_fingerprint:
        return
    differences = []
    if len(tokenizer) != info.vocab_size:
        differences.append(
            f"vocabulary size {info.vocab_size} (teacher) vs {len(tokenizer)} (yours)"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        theirs, ours = getattr(info, name), getattr(tokenizer, name, None)
        if theirs != ours:
            differences.append(f"{name} {theirs} (teacher) vs {ours} (yours)")
    if not differences:
        differences.append("the same size and special tokens, but different tokens at some ids")
    raise TokenizerMismatchError(
        f"the teacher {info.model_id!r} uses a different tokenizer: {'; '.join(differences)} "
        f"(fingerprint {info.tokenizer_fingerprint[:12]} vs {local[:12]}). Its log-probs would "
        "refer to other tokens; use the teacher's tokenizer for the student."
    )


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, on UNAVAILABLE only, within the call's deadline."""

    max_retries: int = 10
    initial_backoff: float = 0.1
    max_backoff: float = 5.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff, self.initial_backoff * 2**attempt))

    def next_delay(
        self, error: grpc.RpcError, attempt: int, deadline: float | None
    ) -> float | None:
        """Seconds to wait before retrying, or None to give up and raise."""
        if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.max_retries:
            return None
        delay = self.delay(attempt)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay


def _channel_options(max_message_bytes: int, retry: RetryPolicy) -> list[tuple[str, Any]]:
    """Message limits, and reconnection paced like the retries: gRPC's own reconnect
    backoff (1 s growing to 120 s) would otherwise fail every retry fast with UNAVAILABLE
    for minutes after a teacher restart."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", int(retry.initial_backoff * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(retry.initial_backoff * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(retry.max_backoff * 1000)),
    ]


TEACHER_SERVICE = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
POOL_SERVICE_CONFIG = json.dumps(
    {
        # spread calls over every replica; skip one whose health check is not SERVING (a
        # replica draining on SIGTERM reports NOT_SERVING before it stops)
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": TEACHER_SERVICE},
    }
)


def channel_target(address: str | Sequence[str]) -> tuple[str, bool]:
    """(gRPC target, is a pool) for one replica or several.

    Several replicas are a list or a comma-separated string of host:port: each host is
    resolved once, here, into gRPC's static `ipv4:`/`ipv6:` list. `dns:///name:port`
    (a Kubernetes headless Service) is a pool gRPC's own resolver keeps up to date.
    """
    endpoints = [address] if isinstance(address, str) else list(address)
    endpoints = [e.strip() for item in endpoints for e in item.split(",") if e.strip()]
    if len(endpoints) == 1:
        return endpoints[0], endpoints[0].startswith("dns:")
    families: dict[str, list[str]] = {"ipv4": [], "ipv6": []}
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"teacher endpoint {endpoint!r}: expected host:port")
        host = host.strip("[]")
        for family, _, _, _, sockaddr in socket.getaddrinfo(host, int(port)):
            if family == socket.AF_INET6:
                families["ipv6"].append(f"[{sockaddr[0]}]:{port}")
            else:
                families["ipv4"].append(f"{sockaddr[0]}:{port}")
    scheme = "ipv4" if families["ipv4"] else "ipv6"
    return f"{scheme}:" + ",".join(dict.fromkeys(families[scheme])), True


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _error(method: str, error: grpc.RpcError) -> TeacherServiceError:
    return TeacherServiceError(method, error.code(), error.details() or "")


class _ClientBase:
    """What both flavours share: target, default deadline, retry policy, one channel."""

    _grpc: Any  # the grpc module (blocking) or grpc.aio: where the channel factories live

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy = RetryPolicy(),
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
        options = _channel_options(max_message_bytes, retry)
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
        deadline, attempt = self._deadline(timeout), 0
        while True:
            try:
                return getattr(self._stub, method)(
                    request, timeout=_remaining(deadline), metadata=self._metadata
                )
            except grpc.RpcError as error:
                delay = self.retry.next_delay(error, attempt, deadline)
                if delay is None:
                    raise _error(method, error) from None
                time.sleep(delay)
                attempt += 1

    def info(self, *, timeout: float | None = None) -> TeacherInfo:
        return parse_info(self._call("Info", pb.InfoRequest(), timeout))

    def score(
        self,
        sequences: Sequence[Any],
        score_from: int | Sequence[int],
        *,
        top_k: int = 64,
        candidates: Any = None,
        full: bool = False,
        temperature: float = 1.0,
        dtype: str = "float32",
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        """Teacher log-probs for each sequence from position score_from on (see DESIGN.md)."""
        request = build_score_request(
            sequences,
            score_from,
            top_k=top_k,
            candidates=candidates,
            full=full,
            temperature=temperature,
            dtype=dtype,
        )
        return parse_score_response(self._call("Score", request, timeout))

    def score_stream(
        self, calls: Iterable[dict[str, Any]], *, window: int = 8, timeout: float | None = None
    ) -> Iterator[list[ScoreResult]]:
        """Pipeline many score calls over one ScoreStream; yields their results in order.

        Each call is a dict of `score` keyword arguments (sequences, score_from, top_k, ...).
        At most `window` requests are in flight. `timeout` bounds the whole stream. A
        refused request raises TeacherServiceError when its turn comes; the stream is not
        retried (resubmit what was not yielded).
        """
        slots = threading.Semaphore(window)
        closed = threading.Event()

        def requests() -> Iterator[pb.ScoreRequest]:
            for index, call in enumerate(calls):
                while not slots.acquire(timeout=0.1):
                    if closed.is_set():
                        return
                yield build_score_request(**call, request_id=str(index))

        stream = self._stub.ScoreStream(
            requests(), timeout=_remaining(self._deadline(timeout)), metadata=self._metadata
        )
        ready: dict[int, pb.ScoreStreamResponse] = {}
        next_index = 0
        try:
            for response in stream:
                slots.release()
                ready[int(response.request_id)] = response
                while next_index in ready:
                    answer = ready.pop(next_index)
                    if answer.HasField("error"):
                        code = next(c for c in grpc.StatusCode if c.value[0] == answer.error.code)
                        raise TeacherServiceError("ScoreStream", code, answer.error.message)
                    yield parse_score_response(answer.response)
                    next_index += 1
        except grpc.RpcError as error:
            raise _error("ScoreStream", error) from None
        finally:
            closed.set()
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
        deadline, attempt = self._deadline(timeout), 0
        while True:
            try:
                return await getattr(self._stub, method)(
                    request, timeout=_remaining(deadline), metadata=self._metadata
                )
            except grpc.aio.AioRpcError as error:
                delay = self.retry.next_delay(error, attempt, deadline)
                if delay is None:
                    raise _error(method, error) from None
                await asyncio.sleep(delay)
                attempt += 1

    async def info(self, *, timeout: float | None = None) -> TeacherInfo:
        return parse_info(await self._call("Info", pb.InfoRequest(), timeout))

    async def score(
        self,
        sequences: Sequence[Any],
        score_from: int | Sequence[int],
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> list[ScoreResult]:
        """TeacherClient.score: options top_k, candidates, full, temperature, dtype."""
        request = build_score_request(sequences, score_from, **options)
        return parse_score_response(await self._call("Score", request, timeout))

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
