"""The native HTTP API: the gRPC calls in JSON or msgpack, on the same engine and batcher."""

from __future__ import annotations

import grpc
import httpx
import msgpack
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from teacher_client import TeacherClient, TeacherServiceError
from teacher_service.config import Limits
from tests.conftest import start_background_server

MSGPACK = "application/msgpack"


def unpack_tensor(tensor: dict) -> np.ndarray:
    """Independent decoding of a msgpack tensor: raw little-endian bytes."""
    dtype = {"float32": "<f4", "float16": "<f2", "int32": "<i4", "bfloat16": "<u2"}[tensor["dtype"]]
    array = np.frombuffer(tensor["data"], dtype=dtype).reshape(tensor["shape"])
    if tensor["dtype"] == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def body(sequences, score_from=1, **fields):
    return {"sequences": [{"token_ids": s, "score_from": score_from} for s in sequences], **fields}


def test_json_score_equals_grpc(http_url, client, sequences):
    answer = httpx.post(f"{http_url}/v1/score", json=body(sequences, 2, top_k=7, temperature=0.8))
    assert answer.status_code == 200, answer.text
    expected = client.score(sequences, 2, top_k=7, temperature=0.8)
    for got, want in zip(answer.json()["results"], expected):
        np.testing.assert_allclose(got["target_logprobs"], want.target_logprobs, atol=1e-5)
        np.testing.assert_allclose(got["topk_logprobs"], want.topk_logprobs, atol=1e-5)
        np.testing.assert_array_equal(got["topk_ids"], want.topk_ids)
        assert "full_logprobs" not in got and "candidate_logprobs" not in got


def test_json_candidates_and_full(http_url, client, sequences):
    seq = sequences[1]
    rows = len(seq) - 3
    per_row = [[(7 * r + j) % 500 for j in range(4)] for r in range(rows)]
    request = {
        "sequences": [{"token_ids": seq, "score_from": 3, "candidate_ids": per_row}],
        "full": True,
    }
    got = httpx.post(f"{http_url}/v1/score", json=request).json()["results"][0]
    (want,) = client.score([seq], 3, top_k=0, candidates=[np.array(per_row)], full=True)
    np.testing.assert_allclose(got["candidate_logprobs"], want.candidate_logprobs, atol=1e-5)
    np.testing.assert_allclose(got["full_logprobs"], want.full_logprobs, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_msgpack_tensors_are_raw_bytes_equal_to_grpc(http_url, client, sequences, dtype):
    payload = msgpack.packb(body(sequences, 1, top_k=64, dtype=dtype))
    answer = httpx.post(
        f"{http_url}/v1/score",
        content=payload,
        headers={"content-type": MSGPACK, "accept": MSGPACK},
    )
    assert answer.headers["content-type"] == MSGPACK
    results = msgpack.unpackb(answer.content)["results"]
    expected = client.score(sequences, 1, top_k=64, dtype=dtype)
    for got, want in zip(results, expected):
        assert got["topk_logprobs"]["dtype"] == dtype
        np.testing.assert_array_equal(unpack_tensor(got["target_logprobs"]), want.target_logprobs)
        np.testing.assert_array_equal(unpack_tensor(got["topk_logprobs"]), want.topk_logprobs)
        np.testing.assert_array_equal(unpack_tensor(got["topk_ids"]), want.topk_ids)
    if dtype == "float16":  # 2 + 64 x (4 + 2) bytes per position, plus msgpack framing
        positions = sum(len(s) - 1 for s in sequences)
        assert len(answer.content) / positions < 420


def test_generate_and_info_equal_grpc(http_url, client, sequences):
    prompts = [s[:4] for s in sequences[:3]]
    request = {"prompts": [{"token_ids": p} for p in prompts], "max_new_tokens": 6, "seed": 3}
    got = httpx.post(f"{http_url}/v1/generate", json=request, timeout=60).json()["completions"]
    want = client.generate(prompts, max_new_tokens=6, seed=3)
    assert [g["token_ids"] for g in got] == [w.token_ids for w in want]
    assert [g["finish_reason"] for g in got] == [w.finish_reason for w in want]
    info, grpc_info = httpx.get(f"{http_url}/v1/info").json(), client.info()
    for name in (
        "model_id",
        "vocab_size",
        "tokenizer_fingerprint",
        "max_seq_len",
        "max_batch_tokens",
    ):
        assert info[name] == getattr(grpc_info, name)
    assert tuple(info["capabilities"]) == grpc_info.capabilities


@pytest.mark.parametrize(
    ("request_body", "status", "named"),
    [
        (body([[1, 2, 900]]), 422, "sequences[0].token_ids[2]"),
        (body([[1, 2]], 2), 422, "sequences[0].score_from"),
        (body([[1, 2, 3]], top_k=9999), 422, "top_k"),
        (body([[1, 2, 3]], temperature=0.0), 422, "temperature"),
        (body([[1, 2, 3]], dtype="int8"), 422, "dtype"),
        (body([[1, 2, 3]], colour="red"), 422, "colour"),
        ({"sequences": [{"token_ids": "abc", "score_from": 1}]}, 422, "token_ids"),
        ({"sequences": [{"token_ids": [1, 2**40], "score_from": 1}]}, 422, "token_ids"),
        (
            {"sequences": [{"token_ids": [1, 2, 3], "score_from": 1, "candidate_ids": [[1]]}]},
            422,
            "sequences[0].candidate_ids",
        ),
        ({}, 422, "sequences"),
    ],
)
def test_bad_score_bodies_name_the_field(http_url, request_body, status, named):
    answer = httpx.post(f"{http_url}/v1/score", json=request_body)
    assert answer.status_code == status, answer.text
    assert named in answer.json()["error"]


def test_malformed_bodies_are_400(http_url):
    answer = httpx.post(
        f"{http_url}/v1/score", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]
    answer = httpx.post(
        f"{http_url}/v1/score", content=b"\xc1\xc1", headers={"content-type": MSGPACK}
    )
    assert answer.status_code == 400 and "not valid msgpack" in answer.json()["error"]


def test_limits_give_413_and_429(tiny_model_dir, backend):
    limits = Limits(max_message_bytes=2048, max_queued_tokens=16)
    running = start_background_server(tiny_model_dir, backend, limits=limits, http_port=0)
    try:
        url = running.http_url
        answer = httpx.post(f"{url}/v1/score", json=body([[1] * 1500]))
        assert answer.status_code == 413 and "max_message_bytes" in answer.json()["error"]
        answer = httpx.post(f"{url}/v1/score", json=body([list(range(1, 30))], top_k=2))
        assert answer.status_code == 429 and "max_queued_tokens" in answer.json()["error"]
        with (
            TeacherClient(running.address) as grpc_client,
            pytest.raises(TeacherServiceError) as error,
        ):
            grpc_client.score([list(range(1, 30))], 1, top_k=2)
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued_tokens" in str(error.value)
        answer = httpx.post(f"{url}/v1/score", json=body([list(range(1, 10))], top_k=2))
        assert answer.status_code == 200  # the service is still up for everyone else
    finally:
        running.stop()


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_metrics_move_with_traffic(http_url, client, sequences):
    scored = metric(http_url, "teacher_tokens_scored_total")
    ok = metric(
        http_url, "teacher_requests_total", frontend="http", method="POST /v1/score", status="200"
    )
    grpc_ok = metric(
        http_url, "teacher_requests_total", frontend="grpc", method="Score", status="OK"
    )
    bad = metric(
        http_url, "teacher_requests_total", frontend="http", method="POST /v1/score", status="422"
    )
    batches = metric(http_url, "teacher_batch_sequences_count")
    computed = metric(http_url, "teacher_tokens_computed_total")
    forwards = metric(http_url, "teacher_batch_padding_fraction_count")
    httpx.post(f"{http_url}/v1/score", json=body(sequences[:2], top_k=3))
    client.score(sequences[2:4], 1, top_k=3)
    httpx.post(f"{http_url}/v1/score", json=body([[1, 2, 900]]))
    positions = sum(len(s) - 1 for s in sequences[:4])
    assert metric(http_url, "teacher_tokens_scored_total") == scored + positions
    # every position the sequences feed ran (no shared prefixes here), padding on top
    assert metric(http_url, "teacher_tokens_computed_total") >= computed + positions
    assert metric(http_url, "teacher_batch_padding_fraction_count") >= forwards + 2
    assert (
        metric(
            http_url,
            "teacher_requests_total",
            frontend="http",
            method="POST /v1/score",
            status="200",
        )
        == ok + 1
    )
    assert (
        metric(http_url, "teacher_requests_total", frontend="grpc", method="Score", status="OK")
        == grpc_ok + 1
    )
    assert (
        metric(
            http_url,
            "teacher_requests_total",
            frontend="http",
            method="POST /v1/score",
            status="422",
        )
        == bad + 1
    )
    assert metric(http_url, "teacher_batch_sequences_count") >= batches + 2
    assert metric(http_url, "teacher_queue_wait_seconds_count") >= 4
    assert metric(http_url, "teacher_queue_sequences") == 0


def test_health_and_docs(http_url):
    assert httpx.get(f"{http_url}/health").status_code == 200
    schema = httpx.get(f"{http_url}/openapi.json").json()
    assert {"/v1/score", "/v1/generate", "/v1/info", "/metrics", "/health"} <= set(schema["paths"])
    assert httpx.get(f"{http_url}/docs").status_code == 200
