"""Mixed ScoreStreams: valid, invalid (bad field values) and undecodable messages in one
stream, sent as raw bytes, and the outcome the service owes each mix. Shared by
tests/test_stream_fuzz.py (hypothesis) and bench/bench_stream_fuzz.py (2,000 at random).

The contract: every message before the first undecodable one is answered (a response for
a valid one, an `error` with INVALID_ARGUMENT for a bad one); the stream then ends with
INVALID_ARGUMENT, or OK if it had no undecodable message. Nothing after it is answered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import grpc

from teacher_client.proto import teacher_pb2 as pb

SCORE_STREAM = "/teacher.v1.Teacher/ScoreStream"
Kind = Literal["valid", "bad", "undecodable"]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
OK = grpc.StatusCode.OK


def _score(ids=(1, 40, 41, 42, 43), score_from=2, **fields) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        sequences=[pb.Sequence(token_ids=list(ids), score_from=score_from)], **fields
    )


VALID = [_score(top_k=3), _score([1, 5, 9], 1), _score([1, 7, 8, 9, 10, 11], 3, top_k=1)]
BAD = [  # each refused by validation with INVALID_ARGUMENT, naming the field
    _score(score_from=0),
    _score(temperature=-1.0),
    _score([1, 10**6, 3]),  # outside the vocabulary
    _score(top_k=10**6),
    pb.ScoreRequest(),  # no sequences
]
# bytes that are not a ScoreRequest: a bad tag, a truncated varint, a field that claims more
# bytes than follow, a wrong wire type for `sequences`, and a valid message with garbage after
UNDECODABLE = [
    b"\xff",
    b"\x18",
    b"\x0a\x05\x08",
    b"\x0d\x00\x00",
    _score().SerializeToString() + b"\xff",
]


def is_undecodable(data: bytes) -> bool:
    """Whether protobuf refuses `data` as a ScoreRequest (what the mix relies on)."""
    try:
        pb.ScoreRequest.FromString(data)
    except Exception:  # protobuf's DecodeError
        return True
    return False


def encode(kind: Kind, n: int, choice: int) -> bytes:
    """Message `n` of a stream: the `choice`-th template of its kind, request_id `n`."""
    if kind == "undecodable":
        return UNDECODABLE[choice % len(UNDECODABLE)]
    templates = VALID if kind == "valid" else BAD
    message = pb.ScoreRequest()
    message.CopyFrom(templates[choice % len(templates)])
    message.request_id = str(n)
    return message.SerializeToString()


@dataclass
class Outcome:
    answers: dict[str, grpc.StatusCode]  # request_id -> OK (a response) or the error's code
    code: grpc.StatusCode  # the stream's final status
    details: str
    seconds: float  # from the call's start to its final status


def expected(kinds: list[Kind]) -> tuple[dict[str, grpc.StatusCode], grpc.StatusCode]:
    """The answers and final status the contract gives a stream of these kinds."""
    answers: dict[str, grpc.StatusCode] = {}
    for n, kind in enumerate(kinds):
        if kind == "undecodable":
            return answers, INVALID
        answers[str(n)] = OK if kind == "valid" else INVALID
    return answers, OK


def run_stream(channel: grpc.Channel, messages: list[bytes], timeout: float) -> Outcome:
    """Send `messages` as raw bytes on one ScoreStream; read answers to its final status.
    A stream the service never ends comes back DEADLINE_EXCEEDED after `timeout`."""
    call = channel.stream_stream(SCORE_STREAM, request_serializer=None, response_deserializer=None)
    answers: dict[str, grpc.StatusCode] = {}
    started = time.perf_counter()
    code, details = OK, ""
    try:
        for raw in call(iter(messages), timeout=timeout):
            answer = pb.ScoreStreamResponse.FromString(raw)
            error = answer.error if answer.WhichOneof("outcome") == "error" else None
            answers[answer.request_id] = OK if error is None else _code(error.code)
    except grpc.RpcError as failure:
        code, details = failure.code(), failure.details() or ""
    return Outcome(answers, code, details, time.perf_counter() - started)


def _code(number: int) -> grpc.StatusCode:
    return next(code for code in grpc.StatusCode if code.value[0] == number)
