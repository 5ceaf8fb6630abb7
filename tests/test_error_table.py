"""Every error kind, provoked for real on every front end where it can occur, is answered
with the gRPC code and the HTTP status of the one table (teacher_service/errors.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import torch

from teacher_client.proto import teacher_pb2 as pb
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_service.config import Limits
from teacher_service.errors import STATUS, UNEXPECTED_KINDS, ErrorKind
from teacher_service.remote import OpenAIBackend, TGIBackend
from teacher_service.server import BackgroundServer
from tests.conftest import start_background_server

K = ErrorKind
LIMITS = Limits(
    max_batch_tokens=64,
    max_tokens_per_request=100,
    max_queued_tokens=32,  # a 40-token sequence overloads the queue on its own
    max_message_bytes=64 * 1024,
)
HTTP_DOORS = ("native", "openai", "tgi")
PATHS = {"native": "/v1/score", "openai": "/v1/completions", "tgi": "/generate"}


class FaultyBackend:
    """The real backend, except that it raises `failure` while the test arms it."""

    def __init__(self, backend) -> None:
        self._backend = backend
        self.failure: BaseException | None = None

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def _fail_if_armed(self) -> None:
        if self.failure is not None:
            raise self.failure

    def score_batch(self, items):
        self._fail_if_armed()
        return self._backend.score_batch(items)

    def generate(self, prompts, options, generator):
        self._fail_if_armed()
        return self._backend.generate(prompts, options, generator)


@dataclass(frozen=True)
class Case:
    kind: ErrorKind
    door: str  # "grpc" or an HTTP dialect
    server: str  # the fixture serving it
    request: Any  # a ScoreRequest (gRPC), a JSON body, raw bytes, or tokenizer -> body
    says: str  # in the message: shows that it is this kind, not another with the same code
    failure: Callable[[], BaseException] | None = None  # what the faulty backend raises
    headers: dict[str, str] | None = None  # HTTP headers; over gRPC, X-Request-Timeout is
    # the call's own timeout

    @property
    def id(self) -> str:
        return f"{self.kind.value}-{self.door}"


def score(ids: list[int], score_from: int = 1, **fields) -> pb.ScoreRequest:
    return pb.ScoreRequest(sequences=[pb.Sequence(token_ids=ids, score_from=score_from)], **fields)


def native(ids: list[int], score_from: int = 1, **fields) -> dict:
    return {"sequences": [{"token_ids": ids, "score_from": score_from}], **fields}


def scoring_completion(ids: list[int], **fields) -> dict:
    """TRL's request: prompt log-probs and one token, from one scoring forward."""
    return {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 1, **fields}


def tgi_details(**parameters) -> Callable[[Any], dict]:
    """A TGI generation whose details are scored, of a text of 40 to 60 tokens."""

    def body(tokenizer) -> dict:
        text = ""
        while len(tokenizer(text)["input_ids"]) <= 40:
            text += "Ada has 12 apples. "
        assert len(tokenizer(text)["input_ids"]) < 60
        return {"inputs": text, "parameters": {"max_new_tokens": 1, "details": True, **parameters}}

    return body


def texts_completion(tokenizer) -> dict:
    """Ids that a TGI upstream can carry (they come back from their text)."""
    return scoring_completion(tokenizer("Ada has 12 apples.")["input_ids"])


def oom() -> BaseException:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def bug() -> BaseException:
    return RuntimeError("an unexpected bug")


EXPIRED = {"X-Request-Timeout": "0"}  # the caller stopped waiting as it sent the request
SHORT, LONG, TOO_MANY = [1, 5, 9, 20], [1] + [7] * 39, [1] * 150
TEXT = {"inputs": "Ada has 12 apples.", "parameters": {"max_new_tokens": 2}}
CASES = [
    Case(K.INVALID_ARGUMENT, "grpc", "server", score(SHORT, 0), "score_from"),
    Case(K.INVALID_ARGUMENT, "native", "server", native(SHORT, 0), "score_from"),
    Case(K.INVALID_ARGUMENT, "openai", "server", {"prompt": SHORT, "n": 0}, "n = 0"),
    Case(K.INVALID_ARGUMENT, "tgi", "server", {"inputs": "x", "stream": True}, "stream"),
    Case(K.TOO_LARGE, "grpc", "faulty", score(TOO_MANY), "max_tokens_per_request"),
    Case(K.TOO_LARGE, "native", "faulty", native(TOO_MANY), "max_tokens_per_request"),
    Case(K.TOO_LARGE, "openai", "faulty", scoring_completion(TOO_MANY), "max_tokens_per_request"),
    Case(K.TOO_LARGE, "tgi", "faulty", b" " * (LIMITS.max_message_bytes + 1), "max_message_bytes"),
    Case(K.UNSUPPORTED, "grpc", "remote", score(SHORT, top_k=5), "'topk' capability"),
    Case(K.UNSUPPORTED, "native", "remote", native(SHORT, top_k=5), "'topk' capability"),
    Case(K.UNSUPPORTED, "openai", "remote", texts_completion, "'topk' capability"),
    Case(K.UNSUPPORTED, "tgi", "remote", tgi_details(top_n_tokens=2), "'topk' capability"),
    Case(K.MALFORMED_BODY, "grpc", "server", b"\xff", "not a valid teacher.v1.ScoreRequest"),
    Case(K.MALFORMED_BODY, "native", "server", b"{nope", "not valid JSON"),
    Case(K.MALFORMED_BODY, "openai", "server", b"{nope", "not valid JSON"),
    Case(K.MALFORMED_BODY, "tgi", "server", b"{nope", "not valid JSON"),
    Case(K.OVERLOADED, "grpc", "faulty", score(LONG), "max_queued_tokens"),
    Case(K.OVERLOADED, "native", "faulty", native(LONG), "max_queued_tokens"),
    Case(K.OVERLOADED, "openai", "faulty", scoring_completion(LONG), "max_queued_tokens"),
    Case(K.OVERLOADED, "tgi", "faulty", tgi_details(), "max_queued_tokens"),
    Case(K.DEADLINE_EXCEEDED, "grpc", "server", score(SHORT), "eadline", headers=EXPIRED),
    Case(K.DEADLINE_EXCEEDED, "native", "server", native(SHORT), "deadline", headers=EXPIRED),
    Case(
        K.DEADLINE_EXCEEDED,
        "openai",
        "server",
        scoring_completion(SHORT),
        "deadline",
        headers=EXPIRED,
    ),
    Case(K.DEADLINE_EXCEEDED, "tgi", "server", tgi_details(), "deadline", headers=EXPIRED),
    Case(K.SHUTTING_DOWN, "grpc", "closed", score(SHORT), "shutting down"),
    Case(K.SHUTTING_DOWN, "native", "closed", native(SHORT), "shutting down"),
    Case(K.SHUTTING_DOWN, "openai", "closed", scoring_completion(SHORT), "shutting down"),
    Case(K.SHUTTING_DOWN, "tgi", "closed", tgi_details(), "shutting down"),
    Case(K.OUT_OF_MEMORY, "grpc", "faulty", score(SHORT), "ran out of memory", oom),
    Case(K.OUT_OF_MEMORY, "native", "faulty", native(SHORT), "ran out of memory", oom),
    Case(K.OUT_OF_MEMORY, "openai", "faulty", scoring_completion(SHORT), "ran out of memory", oom),
    Case(K.OUT_OF_MEMORY, "tgi", "faulty", TEXT, "ran out of memory", oom),
    Case(K.UPSTREAM_FAILED, "grpc", "orphan", score(SHORT), "/v1/"),
    Case(K.UPSTREAM_FAILED, "native", "orphan", native(SHORT), "/v1/"),
    Case(K.UPSTREAM_FAILED, "openai", "orphan", {"prompt": SHORT, "max_tokens": 1}, "/v1/"),
    Case(K.UPSTREAM_FAILED, "tgi", "orphan", TEXT, "/v1/"),
    Case(K.INTERNAL, "grpc", "faulty", score(SHORT), "an unexpected bug", bug),
    Case(K.INTERNAL, "native", "faulty", native(SHORT), "an unexpected bug", bug),
    Case(K.INTERNAL, "openai", "faulty", scoring_completion(SHORT), "an unexpected bug", bug),
    Case(K.INTERNAL, "tgi", "faulty", TEXT, "an unexpected bug", bug),
]


@pytest.fixture(scope="module")
def faulty_backend(backend) -> FaultyBackend:
    return FaultyBackend(backend)


@pytest.fixture(scope="module")
def faulty(tiny_model_dir, faulty_backend) -> Iterator[BackgroundServer]:
    running = start_background_server(
        tiny_model_dir, faulty_backend, limits=LIMITS, http_port=0, max_wait_ms=2.0
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def remote(tiny_model_dir, tokenizer, http_url) -> Iterator[BackgroundServer]:
    """In front of the session server as a TGI upstream: no top-k, no ranks."""
    backend = TGIBackend(http_url, tokenizer, timeout=60)
    running = start_background_server(tiny_model_dir, backend, http_port=0, max_wait_ms=2.0)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def orphan(tiny_model_dir, backend, tokenizer) -> Iterator[BackgroundServer]:
    """In front of an OpenAI-dialect upstream that has gone away since it connected."""
    upstream = start_background_server(tiny_model_dir, backend, grpc=False, http_port=0)
    remote_backend = OpenAIBackend(upstream.http_url, tokenizer, timeout=10)
    upstream.stop()
    running = start_background_server(tiny_model_dir, remote_backend, http_port=0)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def closed(tiny_model_dir, backend) -> Iterator[BackgroundServer]:
    """Both front ends still up, the batcher already closed (as at the end of a shutdown)."""
    running = start_background_server(tiny_model_dir, backend, http_port=0)
    running.call(running.running.engine.batcher.close())
    yield running
    running.stop()


def grpc_failure(
    address: str, request: pb.ScoreRequest | bytes, timeout: float = 60
) -> tuple[grpc.StatusCode, str]:
    """The raw stub (the client library would retry UNAVAILABLE); bytes are sent as they are."""
    with grpc.insecure_channel(address) as channel:
        score = pb_grpc.TeacherStub(channel).Score
        if isinstance(request, bytes):
            score = channel.unary_unary("/teacher.v1.Teacher/Score", request_serializer=None)
        try:
            score(request, timeout=timeout)
        except grpc.RpcError as error:
            return error.code(), error.details()
    pytest.fail(f"{request} succeeded")


def http_failure(
    url: str, door: str, request: Any, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """The status and the message, read from the dialect's own error shape."""
    if isinstance(request, bytes):
        headers = {"content-type": "application/json", **(headers or {})}
        answer = httpx.post(url + PATHS[door], content=request, headers=headers, timeout=60)
    else:
        answer = httpx.post(url + PATHS[door], json=request, headers=headers, timeout=60)
    error = answer.json()["error"]
    if door == "openai":
        assert error["code"] == answer.status_code
        assert error["type"] == (
            {429: "rate_limit_error", 503: "service_unavailable_error"}.get(answer.status_code)
            or ("invalid_request_error" if answer.status_code < 500 else "server_error")
        )
        return answer.status_code, error["message"]
    if door == "tgi":
        error_type = answer.json()["error_type"]
        assert error_type == (
            "overloaded"
            if answer.status_code == 429
            else "validation"
            if answer.status_code < 500
            else "generation"
        )
    return answer.status_code, error


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_each_kind_gets_the_tables_code_and_status_on_each_front_end(
    request, case, tokenizer, caplog
):
    server: BackgroundServer = request.getfixturevalue(case.server)
    payload = case.request(tokenizer) if callable(case.request) else case.request
    faulty_backend = request.getfixturevalue("faulty_backend") if case.failure else None
    if faulty_backend is not None:
        faulty_backend.failure = case.failure()
    try:
        with caplog.at_level(logging.ERROR, logger="teacher_service.errors"):
            if case.door == "grpc":
                timeout = float(case.headers["X-Request-Timeout"]) if case.headers else 60
                code, message = grpc_failure(server.address, payload, max(timeout, 1e-3))
                assert code == STATUS[case.kind].grpc, message
            else:
                status, message = http_failure(server.http_url, case.door, payload, case.headers)
                assert status == STATUS[case.kind].http, message
    finally:
        if faulty_backend is not None:
            faulty_backend.failure = None
    assert case.says in message
    logged = [r for r in caplog.records if r.name == "teacher_service.errors" and r.exc_info]
    assert bool(logged) == (case.kind in UNEXPECTED_KINDS), "unexpected errors are logged"


def test_the_table_has_a_row_for_every_kind():
    assert set(STATUS) == set(ErrorKind)


def test_every_kind_is_provoked_on_both_front_ends():
    on_grpc = {case.kind for case in CASES if case.door == "grpc"}
    assert on_grpc == set(ErrorKind)
    for door in HTTP_DOORS:
        assert {case.kind for case in CASES if case.door == door} == set(ErrorKind), door
