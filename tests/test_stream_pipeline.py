"""The ScoreStream bookkeeping both clients share (teacher_client/pipeline.py), driven by
hand with explicit times: the window, the order of results, and a refused request sent
again after its hint, before anything after it, within the stream's deadline."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from teacher_client.codec import encode_numpy
from teacher_client.pipeline import DONE, Pipeline, StreamRefused, Wait
from teacher_client.proto import teacher_pb2 as pb
from teacher_client.retry import BACKPRESSURE_JITTER


def _calls(n: int) -> list[dict]:
    return [{"sequences": [[1, 2, 3 + i]], "score_from": 1, "top_k": 0} for i in range(n)]


def _result(request: pb.ScoreRequest) -> pb.ScoreStreamResponse:
    """A response whose target log-prob is the request's last token id (to tell them apart)."""
    last = request.sequences[0].token_ids[-1]
    target = encode_numpy(np.array([-float(last)] * 2), "float32")
    scores = pb.SequenceScores(target_logprobs=target)
    response = pb.ScoreResponse(request_id=request.request_id, results=[scores])
    return pb.ScoreStreamResponse(request_id=request.request_id, response=response)


def _refusal(request: pb.ScoreRequest, code=grpc.StatusCode.RESOURCE_EXHAUSTED, hint=None):
    error = pb.ErrorStatus(code=code.value[0], message="busy", retry_after_s=hint)
    return pb.ScoreStreamResponse(request_id=request.request_id, error=error)


def _last_token(results) -> int:
    return int(-results[0].target_logprobs[0])


def test_at_most_the_window_is_in_flight_and_results_come_in_call_order():
    pipeline = Pipeline(_calls(4), window=2, deadline=None)
    first, second = pipeline.next_request(0.0), pipeline.next_request(0.0)
    assert [first.request_id, second.request_id] == ["0", "1"]
    assert pipeline.next_request(0.0) == Wait(None)  # the window is full
    pipeline.answered(_result(second), 0.0)
    assert pipeline.take_ready() == ([], None)  # 1 waits for 0
    third = pipeline.next_request(0.0)
    pipeline.answered(_result(first), 0.0)
    results, failed = pipeline.take_ready()
    assert [_last_token(r) for r in results] == [3, 4] and failed is None
    fourth = pipeline.next_request(0.0)
    assert pipeline.next_request(0.0) == Wait(None)  # nothing left to send, two in flight
    pipeline.answered(_result(fourth), 0.0)
    pipeline.answered(_result(third), 0.0)
    assert [_last_token(r) for r in pipeline.take_ready()[0]] == [5, 6]
    assert pipeline.next_request(0.0) is DONE


def test_a_refused_request_is_sent_again_after_its_hint_before_anything_after_it():
    pipeline = Pipeline(_calls(3), window=3, deadline=100.0)
    sent = [pipeline.next_request(0.0) for _ in range(2)]
    pipeline.answered(_refusal(sent[0], hint=2.0), 1.0)  # back at 3.0 - 3.2
    pipeline.answered(_result(sent[1]), 1.0)
    assert pipeline.take_ready() == ([], None)  # the result of 1 waits for 0
    waiting = pipeline.next_request(1.0)  # nothing is sent before the hint, not even call 2
    assert isinstance(waiting, Wait) and 2.0 <= waiting.seconds <= 2.0 * (1 + BACKPRESSURE_JITTER)
    again = pipeline.next_request(1.0 + waiting.seconds)
    assert again.request_id == "0" and again.SerializeToString() == sent[0].SerializeToString()
    assert pipeline.next_request(1.0 + waiting.seconds).request_id == "2"
    pipeline.answered(_result(again), 4.0)
    assert [_last_token(r) for r in pipeline.take_ready()[0]] == [3, 4]
    assert pipeline.resubmitted == 1


@pytest.mark.parametrize(
    "refusal",
    [
        {"hint": 2.0},  # back-pressure, but the hint would pass the deadline
        {"code": grpc.StatusCode.INVALID_ARGUMENT},
        {"code": grpc.StatusCode.RESOURCE_EXHAUSTED},  # too large: no hint, not retried
    ],
    ids=["hint-past-deadline", "invalid", "no-hint"],
)
def test_a_request_that_fails_for_good_stops_the_results_at_its_turn(refusal):
    pipeline = Pipeline(_calls(3), window=3, deadline=2.5)
    sent = [pipeline.next_request(0.0) for _ in range(3)]
    pipeline.answered(_result(sent[0]), 1.0)
    pipeline.answered(_result(sent[2]), 1.0)
    pipeline.answered(_refusal(sent[1], **refusal), 1.0)
    results, failed = pipeline.take_ready()
    assert [_last_token(r) for r in results] == [3]  # what came before it, then the failure
    assert isinstance(failed, StreamRefused) and failed.message == "busy"
    assert failed.code == refusal.get("code", grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert failed.retry_after == refusal.get("hint")
    assert pipeline.resubmitted == 0


def test_a_window_below_one_is_refused():
    with pytest.raises(ValueError, match="window must be >= 1"):
        Pipeline(_calls(1), window=0, deadline=None)
