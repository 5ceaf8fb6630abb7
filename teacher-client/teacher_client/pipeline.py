"""What a ScoreStream keeps, for both clients: the window of requests in flight, the
order results are yielded in, and the resubmission of refused requests.

An overloaded server refuses a stream's request with RESOURCE_EXHAUSTED and a retry hint
(`error.retry_after_s`) and the stream goes on. The request is sent again on the same
stream once the hint has passed (jittered as retry.RetryPolicy does), before any request
after it, and nothing new is sent meanwhile: the server has said it has no room, and a
request sent into a refusal only costs it a refusal. Results are yielded in the order of
the calls, so a resubmitted request holds back those after it. A refusal whose hint would
pass the stream's deadline, and every other error, is raised when its turn comes.

`Pipeline` is the bookkeeping alone, with no waiting and no I/O: the blocking client
drives it from gRPC's request thread and its own, the asyncio client from two tasks.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from teacher_client.messages import (
    ScoreOptions,
    ScoreResult,
    build_score_request,
    merge_score_options,
    parse_score_response,
)
from teacher_client.proto import teacher_pb2 as pb
from teacher_client.retry import BACKPRESSURE_JITTER


class StreamRefused(Exception):
    """A stream's request failed for good: (code, message, retry hint) for the client's
    TeacherServiceError, raised when the request's turn comes."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after


@dataclass(frozen=True)
class Wait:
    """Nothing to send for now: ask again after `seconds` (None: once an answer arrives)."""

    seconds: float | None


DONE = object()  # every call was sent and answered: the request stream may end


def call_request(
    sequences: Sequence[Any],
    score_from: int | Sequence[int],
    options: ScoreOptions | None = None,
    *,
    candidates: Any = None,
    request_id: str,
    **option_fields: Any,
) -> pb.ScoreRequest:
    """One stream call (the keyword arguments of the clients' `score`) as its request."""
    options = merge_score_options(options, option_fields)
    return build_score_request(
        sequences, score_from, options, candidates=candidates, request_id=request_id
    )


class Pipeline:
    """The state of one ScoreStream (see the module docstring). Not thread-safe: callers
    hold their own lock."""

    def __init__(
        self, calls: Iterable[dict[str, Any]], window: int, deadline: float | None
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._calls = enumerate(calls)
        self._window = window
        self._deadline = deadline
        self._exhausted = False
        self._sent: dict[int, dict[str, Any]] = {}  # in flight: index -> the call
        self._refused: dict[int, dict[str, Any]] = {}  # to send again, lowest index first
        self._resume_at = 0.0  # time.monotonic() before which nothing is sent
        self._answers: dict[int, ScoreResult | StreamRefused] = {}
        self._next = 0  # the next index to yield
        self.resubmitted = 0  # requests sent again after a refusal

    def next_request(self, now: float | None = None) -> pb.ScoreRequest | Wait | object:
        """The next request to send, a Wait, or DONE."""
        now = time.monotonic() if now is None else now
        if len(self._sent) >= self._window:
            return Wait(None)
        if now < self._resume_at:
            return Wait(self._resume_at - now)
        if self._refused:
            index = min(self._refused)
            call = self._refused.pop(index)
        else:
            following = None if self._exhausted else next(self._calls, None)
            if following is None:
                self._exhausted = True
                return Wait(None) if self._sent else DONE
            index, call = following
        self._sent[index] = call
        return call_request(**call, request_id=str(index))

    def answered(self, response: pb.ScoreStreamResponse, now: float | None = None) -> None:
        """Record one response of the stream: a result, a refusal to send again, or an error."""
        now = time.monotonic() if now is None else now
        index = int(response.request_id)
        call = self._sent.pop(index)
        if not response.HasField("error"):
            self._answers[index] = parse_score_response(response.response)
            return
        status = response.error
        code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
        hint = status.retry_after_s if status.HasField("retry_after_s") else None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and hint is not None:
            returns = now + hint * random.uniform(1.0, 1.0 + BACKPRESSURE_JITTER)
            if self._deadline is None or returns < self._deadline:
                self._refused[index] = call
                self._resume_at = max(self._resume_at, returns)
                self.resubmitted += 1
                return
        self._answers[index] = StreamRefused(code, status.message, hint)

    def take_ready(self) -> tuple[list[ScoreResult], StreamRefused | None]:
        """The results whose turn has come, in order, and the failure that stops them
        (a request that failed for good, at its turn), if one does."""
        results: list[ScoreResult] = []
        while self._next in self._answers:
            answer = self._answers.pop(self._next)
            if isinstance(answer, StreamRefused):
                return results, answer
            results.append(answer)
            self._next += 1
        return results, None
