"""One ScoreOptions value for a Score call's options: the request builder, both clients
(which still take the options as keywords, merged into it), their streams, the in-process
teacher and the service's scoring math all read the same value, and the wire format is the
same whichever way the options were given."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch

from teacher_client import AsyncTeacherClient, ScoreOptions, TeacherClient, build_score_request
from teacher_client.pipeline import Pipeline
from teacher_client.proto import teacher_pb2 as pb
from teacher_service import scoring
from teacher_service.in_process import InProcessTeacher

SEQUENCES = [[1, 5, 9, 2], [1, 7, 3]]
STARTS = [2, 1]
CANDIDATES = [np.array([[4, 6], [8, 3]]), np.array([[2, 9], [5, 1]])]  # [rows, m] each
# every field away from its default, so a field that is dropped or swapped shows
OPTIONS = ScoreOptions(top_k=5, full=True, temperature=0.75, dtype="bfloat16")
KEYWORDS = dict(top_k=5, full=True, temperature=0.75, dtype="bfloat16")


def expected_request() -> pb.ScoreRequest:
    """The proto as docs/design.md spells it, field by field, not through the builder."""
    sequences = [
        pb.Sequence(
            token_ids=tokens,
            score_from=start,
            candidate_ids=pb.Tensor(
                dtype=pb.INT32, shape=list(ids.shape), data=ids.astype("<i4").tobytes()
            ),
        )
        for tokens, start, ids in zip(SEQUENCES, STARTS, CANDIDATES)
    ]
    return pb.ScoreRequest(
        sequences=sequences, top_k=5, full=True, temperature=0.75, dtype=pb.BFLOAT16
    )


class RecordingStub:
    """Stands in for the gRPC stub: keeps each Score request, answers with no results."""

    def __init__(self, asynchronous: bool) -> None:
        self.requests: list[pb.ScoreRequest] = []
        self.asynchronous = asynchronous

    def Score(self, request: pb.ScoreRequest, **_: object):
        self.requests.append(request)
        if not self.asynchronous:
            return pb.ScoreResponse()

        async def answer() -> pb.ScoreResponse:
            return pb.ScoreResponse()

        return answer()


def sent_by_score(flavour: str, *args, **kwargs) -> bytes:
    """The serialized request one `score` call of a client of that flavour sends."""
    if flavour == "blocking":
        client = TeacherClient("localhost:1")
        client._stub = stub = RecordingStub(asynchronous=False)
        client.score(*args, **kwargs)
        client.close()
    else:

        async def call() -> RecordingStub:
            client = AsyncTeacherClient("localhost:1")
            client._stub = recorder = RecordingStub(asynchronous=True)
            await client.score(*args, **kwargs)
            await client.close()
            return recorder

        stub = asyncio.run(call())
    (request,) = stub.requests
    return request.SerializeToString()


@pytest.mark.parametrize("flavour", ["blocking", "asyncio"])
def test_keywords_and_a_score_options_send_byte_identical_requests(flavour):
    expected = expected_request().SerializeToString()
    keywords = sent_by_score(flavour, SEQUENCES, STARTS, candidates=CANDIDATES, **KEYWORDS)
    value = sent_by_score(flavour, SEQUENCES, STARTS, OPTIONS, candidates=CANDIDATES)
    overridden = ScoreOptions(top_k=1, dtype="float16")  # keywords replace its fields
    both = sent_by_score(flavour, SEQUENCES, STARTS, overridden, candidates=CANDIDATES, **KEYWORDS)
    assert keywords == value == both == expected


def test_the_builder_and_a_stream_call_send_the_same_bytes_as_score():
    expected = expected_request().SerializeToString()
    built = build_score_request(SEQUENCES, STARTS, OPTIONS, candidates=CANDIDATES)
    assert built.SerializeToString() == expected
    calls = [
        dict(sequences=SEQUENCES, score_from=STARTS, candidates=CANDIDATES, **KEYWORDS),
        dict(sequences=SEQUENCES, score_from=STARTS, options=OPTIONS, candidates=CANDIDATES),
    ]
    pipeline = Pipeline(calls, window=2, deadline=None)
    for index in range(2):
        streamed = pipeline.next_request(0.0)
        assert streamed.request_id == str(index)
        streamed.request_id = ""  # the one field a stream adds
        assert streamed.SerializeToString() == expected


def test_the_defaults_are_those_of_a_call_without_options():
    default = build_score_request(SEQUENCES, 1).SerializeToString()
    assert sent_by_score("blocking", SEQUENCES, 1) == default
    assert sent_by_score("blocking", SEQUENCES, 1, ScoreOptions()) == default
    by_hand = pb.ScoreRequest(
        sequences=[pb.Sequence(token_ids=s, score_from=1) for s in SEQUENCES],
        top_k=64,
        temperature=1.0,
        dtype=pb.FLOAT32,
    )
    assert default == by_hand.SerializeToString()


@pytest.mark.parametrize("flavour", ["blocking", "asyncio"])
def test_an_unknown_option_name_is_refused_naming_it(flavour):
    with pytest.raises(TypeError, match=r"'topk'.*top_k, full, temperature, dtype"):
        sent_by_score(flavour, SEQUENCES, 1, topk=5)
    with pytest.raises(TypeError, match="'request_id'"):  # the builder's, not score's
        sent_by_score(flavour, SEQUENCES, 1, OPTIONS, request_id="7")
    pipeline = Pipeline([dict(sequences=SEQUENCES, score_from=1, temprature=0.5)], 1, None)
    with pytest.raises(TypeError, match="'temprature'"):
        pipeline.next_request(0.0)


def test_a_wire_dtype_the_codec_lacks_is_refused_by_the_builder():
    with pytest.raises(ValueError, match="dtype = 'int8'"):
        build_score_request(SEQUENCES, 1, ScoreOptions(dtype="int8"))


def test_the_scoring_math_takes_the_clients_options_with_a_torch_dtype():
    for dtype, torch_dtype in [
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
    ]:
        client = dataclasses.replace(OPTIONS, dtype=dtype)
        assert scoring.ScoreOptions.from_client(client) == scoring.ScoreOptions(
            top_k=5, full=True, temperature=0.75, dtype=torch_dtype, ranks=False
        )


def test_the_in_process_teacher_answers_a_score_options_as_the_service_does(
    backend, client, sequences
):
    options = dataclasses.replace(OPTIONS, dtype="float32")
    starts = [2] * 3
    candidates = [np.array([3, 8, 11])] * 3  # [m]: the same ids for every row
    local = InProcessTeacher(backend).score(sequences[:3], starts, options, candidates=candidates)
    remote = client.score(sequences[:3], starts, options, candidates=candidates)
    for got, want in zip(local, remote, strict=True):
        np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
        for name in ("target_logprobs", "topk_logprobs", "candidate_logprobs", "full_logprobs"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=1e-5)
