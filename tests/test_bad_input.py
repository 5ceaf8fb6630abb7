"""Bad input gets a status naming the field; the service keeps serving everyone else."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from teacher_client import TeacherClient, TeacherServiceError
from teacher_client.codec import encode_numpy
from teacher_client.proto import teacher_pb2 as pb
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_service.config import Limits
from tests.conftest import GatedBackend, reference_logprobs, start_background_server

INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_LARGE = grpc.StatusCode.RESOURCE_EXHAUSTED


def _request(ids=(1, 5, 9, 20), score_from=1, **fields) -> pb.ScoreRequest:
    sequence = pb.Sequence(token_ids=list(ids), score_from=score_from)
    candidates = fields.pop("candidates", None)
    if candidates is not None:
        sequence.candidate_ids.CopyFrom(candidates)
    return pb.ScoreRequest(sequences=[sequence], **fields)


def _assert_good_request_succeeds(stub, backend) -> None:
    ids = [1, 40, 41, 42, 43]
    response = stub.Score(_request(ids, 2, top_k=3), timeout=30)
    expected = reference_logprobs(backend, ids)[1:4].numpy()
    target = np.frombuffer(response.results[0].target_logprobs.data, "<f4")
    np.testing.assert_allclose(target, expected[np.arange(3), ids[2:]], atol=1e-5)


def _assert_refused_then_good_works(call, request, code, field, stub, backend) -> None:
    """The call fails with `code` naming `field`, and the next good request succeeds."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    assert caught.value.code() == code, (field, caught.value.details())
    assert field in caught.value.details(), (field, caught.value.details())
    _assert_good_request_succeeds(stub, backend)


def _bad_score_requests(vocab: int) -> list[tuple[str, pb.ScoreRequest, grpc.StatusCode, str]]:
    nan, inf = math.nan, math.inf
    return [
        ("no sequences", pb.ScoreRequest(top_k=1), INVALID, "sequences"),
        ("empty sequence", _request(ids=[]), INVALID, "sequences[0].token_ids"),
        ("score_from 0", _request(score_from=0), INVALID, "sequences[0].score_from"),
        ("score_from = len", _request(score_from=4), INVALID, "sequences[0].score_from"),
        ("negative token", _request(ids=[1, -3, 4]), INVALID, "sequences[0].token_ids[1]"),
        ("token = vocab", _request(ids=[1, 2, vocab]), INVALID, "sequences[0].token_ids[2]"),
        ("negative top_k", _request(top_k=-1), INVALID, "top_k"),
        ("top_k > vocab", _request(top_k=vocab + 1), INVALID, "top_k"),
        (
            "candidate = vocab",
            _request(candidates=encode_numpy(np.array([0, vocab]), "int32")),
            INVALID,
            "sequences[0].candidate_ids[1]",
        ),
        (
            "negative candidate",
            _request(candidates=encode_numpy(np.array([[1], [-1], [2]]), "int32")),
            INVALID,
            "sequences[0].candidate_ids[1, 0]",
        ),
        (
            "candidate rows",
            _request(candidates=encode_numpy(np.zeros((2, 2)), "int32")),
            INVALID,
            "sequences[0].candidate_ids",
        ),
        (
            "candidate dtype",
            _request(candidates=encode_numpy(np.zeros(2), "float32")),
            INVALID,
            "sequences[0].candidate_ids",
        ),
        (
            "candidate bytes",
            _request(candidates=pb.Tensor(dtype=pb.INT32, shape=[3], data=b"\0" * 4)),
            INVALID,
            "sequences[0].candidate_ids",
        ),
        ("temperature 0", _request(temperature=0.0), INVALID, "temperature"),
        ("temperature < 0", _request(temperature=-1.0), INVALID, "temperature"),
        ("temperature nan", _request(temperature=nan), INVALID, "temperature"),
        ("temperature inf", _request(temperature=inf), INVALID, "temperature"),
        ("unknown dtype", _request(dtype=99), INVALID, "dtype"),
        ("integer dtype", _request(dtype=pb.INT32), INVALID, "dtype"),
        ("longer than the model", _request(ids=[1] * 600), INVALID, "max_seq_len"),
    ]


def test_every_bad_score_input_gets_its_status_and_the_next_good_request_works(stub, backend):
    for _, request, code, field in _bad_score_requests(backend.vocab_size):
        _assert_refused_then_good_works(stub.Score, request, code, field, stub, backend)


def test_bad_generate_inputs(stub, backend):
    prompt = [pb.Prompt(token_ids=[1, 5, 6])]
    cases = [
        ("no prompts", pb.GenerateRequest(max_new_tokens=2), "prompts"),
        ("empty prompt", pb.GenerateRequest(prompts=[pb.Prompt()], max_new_tokens=2), "prompts[0]"),
        (
            "token out of range",
            pb.GenerateRequest(
                prompts=[pb.Prompt(token_ids=[1, backend.vocab_size])], max_new_tokens=2
            ),
            "prompts[0]",
        ),
        ("max_new_tokens 0", pb.GenerateRequest(prompts=prompt), "max_new_tokens"),
        (
            "temperature < 0",
            pb.GenerateRequest(prompts=prompt, max_new_tokens=2, temperature=-1),
            "temperature",
        ),
        ("top_p 0", pb.GenerateRequest(prompts=prompt, max_new_tokens=2, top_p=0), "top_p"),
        ("top_p > 1", pb.GenerateRequest(prompts=prompt, max_new_tokens=2, top_p=1.5), "top_p"),
        ("past max_seq_len", pb.GenerateRequest(prompts=prompt, max_new_tokens=510), "max_seq_len"),
    ]
    for _, request, field in cases:
        _assert_refused_then_good_works(stub.Generate, request, INVALID, field, stub, backend)


def test_bad_requests_do_not_disturb_good_ones_running_beside_them(stub, backend):
    bad = [request for _, request, _, _ in _bad_score_requests(backend.vocab_size)]
    failures: list[BaseException] = []

    def good_loop():
        try:
            for _ in range(10):
                _assert_good_request_succeeds(stub, backend)
        except BaseException as error:  # reported below
            failures.append(error)

    threads = [threading.Thread(target=good_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    for request in bad * 2:
        with pytest.raises(grpc.RpcError):
            stub.Score(request, timeout=30)
    for thread in threads:
        thread.join()
    assert not failures


@pytest.fixture(scope="module")
def limited_server(tiny_model_dir, backend):
    limits = Limits(
        max_batch_tokens=64,
        max_tokens_per_request=100,
        max_sequences_per_request=4,
        max_message_bytes=16 * 1024,
    )
    running = start_background_server(tiny_model_dir, backend, limits=limits)
    yield running
    running.stop()


def test_requests_over_the_configured_limits_are_resource_exhausted(limited_server, backend):
    channel = grpc.insecure_channel(limited_server.address)
    stub = pb_grpc.TeacherStub(channel)
    seq = lambda n: pb.Sequence(token_ids=[1] * n, score_from=1)  # noqa: E731
    cases = [
        (
            "sequences per request",
            pb.ScoreRequest(sequences=[seq(3)] * 5),
            "max_sequences_per_request",
        ),
        ("tokens per request", pb.ScoreRequest(sequences=[seq(40)] * 3), "max_tokens_per_request"),
        ("sequence over one batch", pb.ScoreRequest(sequences=[seq(80)]), "max_batch_tokens"),
        (
            "response too large",
            pb.ScoreRequest(sequences=[seq(30)], full=True),
            "max_message_bytes",
        ),
        (
            "message too large",
            pb.ScoreRequest(
                sequences=[
                    pb.Sequence(
                        token_ids=[1] * 10,
                        score_from=1,
                        candidate_ids=encode_numpy(np.ones((9, 600)), "int32"),
                    )
                ]
            ),
            "message",
        ),
    ]
    for _, request, field in cases:
        _assert_refused_then_good_works(stub.Score, request, TOO_LARGE, field, stub, backend)
    channel.close()


def test_client_side_errors_name_the_argument(client):
    with pytest.raises(ValueError, match="dtype"):
        client.score([[1, 2, 3]], 1, dtype="int8")
    with pytest.raises(ValueError, match="score_from"):
        client.score([[1, 2, 3], [1, 2]], [1])
    with pytest.raises(ValueError, match=r"sequences\[1\]"):
        client.score([[1, 2, 3], [[1, 2]]], 1)
    with pytest.raises(TeacherServiceError, match=r"INVALID_ARGUMENT.*score_from") as caught:
        client.score([[1, 2, 3]], 3)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_caller_that_hits_its_deadline_leaves_nothing_in_the_batcher(tiny_model_dir, backend):
    # a batch holding token 99 waits for the test's gate
    gated = GatedBackend(
        backend, lambda items: any(99 in item.token_ids.tolist() for item in items), open=False
    )
    running = start_background_server(tiny_model_dir, gated)
    batcher = running.running.engine.batcher
    try:
        with TeacherClient(running.address) as teacher, ThreadPoolExecutor(1) as pool:
            busy = pool.submit(teacher.score, [[1, 99, 3]], 1)  # holds the model worker
            assert gated.entered.wait(timeout=30)
            with pytest.raises(TeacherServiceError) as caught:
                teacher.score([[1, 2, 3, 4]] * 3, 1, timeout=0.3)  # queued behind it
            assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            deadline = time.monotonic() + 2.0
            while batcher.pending and time.monotonic() < deadline:
                time.sleep(0.01)
            # the batcher knows the caller's deadline: its sequences expire, counted as such
            assert batcher.pending == 0 and batcher.stats.expired == 3
            gated.gate.set()
            assert busy.result(timeout=30)[0].target_logprobs.shape == (2,)
            # the abandoned sequences never ran, and the service still answers
            (result,) = teacher.score([[1, 2, 3, 4]], 1, top_k=0, timeout=30)
            assert result.target_logprobs.shape == (3,)
            assert batcher.stats.sequences == 2
    finally:
        gated.gate.set()
        running.stop()


def test_a_bad_request_in_a_stream_gets_an_error_and_the_stream_goes_on(stub, backend):
    good = lambda: _request([1, 40, 41, 42, 43], 2, top_k=3)  # noqa: E731
    requests = [good(), _request(score_from=0), good(), _request(temperature=-1.0), good()]
    for n, request in enumerate(requests):
        request.request_id = str(n)
    answers = {a.request_id: a for a in stub.ScoreStream(iter(requests), timeout=30)}
    assert sorted(answers) == ["0", "1", "2", "3", "4"]
    for n in ("1", "3"):
        assert answers[n].WhichOneof("outcome") == "error"
        assert answers[n].error.code == INVALID.value[0]
    assert "score_from" in answers["1"].error.message
    assert "temperature" in answers["3"].error.message
    expected = reference_logprobs(backend, [1, 40, 41, 42, 43])[1:4].numpy()
    for n in ("0", "2", "4"):
        target = answers[n].response.results[0].target_logprobs
        np.testing.assert_allclose(
            np.frombuffer(target.data, "<f4"), expected[np.arange(3), [41, 42, 43]], atol=1e-5
        )


def test_generate_splits_a_large_request_into_batches_that_fit(limited_server, sequences):
    # 64 max_batch_tokens: 3 prompts x (8 + 16 tokens) cannot share one batch
    prompts = [s[:8] for s in sequences if len(s) >= 8][:3]
    assert len(prompts) == 3
    greedy = dict(max_new_tokens=16, temperature=0.0, stop_at_eos=False)
    with TeacherClient(limited_server.address) as teacher:
        together = teacher.generate(prompts, **greedy)
        for prompt, completion in zip(prompts, together):
            (alone,) = teacher.generate([prompt], **greedy)
            assert completion.token_ids == alone.token_ids
        with pytest.raises(TeacherServiceError) as caught:
            teacher.generate([sequences[0][:8]], max_new_tokens=60)
        assert caught.value.code == TOO_LARGE and "max_batch_tokens" in caught.value.details
