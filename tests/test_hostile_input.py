"""Hostile input: whatever bytes arrive, on any method, route or encoding, the answer is a
4xx / INVALID_ARGUMENT-class status naming what is wrong, never a 5xx, INTERNAL or
UNKNOWN, and the next good request is served correctly. Plus connection hygiene: slow
HTTP clients are closed within the configured read deadlines, and the connection cap
holds. Fuzzing is bounded (examples and time) so the file runs in well under a minute.
"""

from __future__ import annotations

import json
import logging
import math
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import msgpack
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teacher_client.codec import CodecError, decode_numpy
from teacher_client.proto import teacher_pb2 as pb
from teacher_service.config import Limits
from teacher_service.errors import PeerWarnings
from teacher_service.server import BackgroundServer
from tests.conftest import reference_logprobs, start_background_server

MSGPACK = "application/msgpack"
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
GOOD_IDS = [1, 40, 41, 42, 43]
HEADER_TIMEOUT, BODY_TIMEOUT = 1.0, 1.0
pytestmark = pytest.mark.timeout(60)  # each test; together they take about 15 s
FUZZ = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

# every unary method (the path, a valid request) and the streaming ones
UNARY = {
    "/teacher.v1.Teacher/Score": pb.ScoreRequest(
        sequences=[pb.Sequence(token_ids=GOOD_IDS, score_from=2)], top_k=3
    ),
    "/teacher.v1.Teacher/Generate": pb.GenerateRequest(
        prompts=[pb.Prompt(token_ids=[1, 5, 6])], max_new_tokens=2
    ),
    "/teacher.v1.Teacher/Info": pb.InfoRequest(),
    "/grpc.health.v1.Health/Check": health_pb2.HealthCheckRequest(),
}
STREAMING = [
    "/teacher.v1.Teacher/ScoreStream",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)
GOOD_SCORE = {"sequences": [{"token_ids": GOOD_IDS, "score_from": 2}], "top_k": 3}
# every HTTP route taking a body: a valid body using most of its fields (the fuzzer's
# starting point), and whether the route takes msgpack
ROUTES: dict[str, tuple[dict[str, Any], bool]] = {
    "/v1/score": (
        {
            "sequences": [
                {"token_ids": GOOD_IDS, "score_from": 2, "candidate_ids": [[1, 2], [3, 4], [5, 6]]},
                {"token_ids": [1, 5, 6], "score_from": 1, "candidate_ids": [7, 8]},
            ],
            **{
                "top_k": 3,
                "full": False,
                "temperature": 0.8,
                "dtype": "float16",
                "request_id": "r",
            },
        },
        True,
    ),
    "/v1/generate": (
        {
            "prompts": [{"token_ids": [1, 5, 6]}, {"token_ids": [1, 7]}],
            **{"max_new_tokens": 2, "temperature": 0.5, "top_p": 0.9, "seed": 1},
            **{"ignore_eos": True, "request_id": "r"},
        },
        True,
    ),
    "/v1/completions": (
        {
            "prompt": ["Ada has", [1, 5, 6]],
            **{"max_tokens": 2, "logprobs": 2, "prompt_logprobs": 1, "echo": True},
            **{"stop": ["x"], "temperature": 0.5, "top_p": 0.9, "seed": 1},
            **{"return_token_ids": True, "return_tokens_as_token_ids": False, "top_k": -1},
        },
        False,
    ),
    "/v1/chat/completions": (
        {
            "messages": [
                {"role": "system", "content": "Count."},
                {"role": "user", "content": [{"type": "text", "text": "Ada has"}]},
            ],
            **{"chat_template": CHAT_TEMPLATE, "chat_template_kwargs": {"x": 1}},
            **{"max_completion_tokens": 2, "logprobs": True, "top_logprobs": 2},
            **{"prompt_logprobs": 1, "stop": ["x"], "temperature": 0.5, "top_p": 0.9},
            **{"seed": 1, "return_token_ids": True, "add_generation_prompt": True},
        },
        False,
    ),
    "/generate": (
        {
            "inputs": "Ada has",
            "parameters": {
                **{"max_new_tokens": 2, "details": True, "decoder_input_details": True},
                **{"top_n_tokens": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.9},
                **{"seed": 3, "stop": ["x"], "truncate": 5, "return_full_text": True},
            },
        },
        False,
    ),
    "/": ({"inputs": "Ada has", "parameters": {"max_new_tokens": 2, "details": True}}, False),
}


@pytest.fixture(scope="module")
def guarded(tiny_model_dir, backend) -> Iterator[BackgroundServer]:
    """Both front ends with small limits (a fuzzed request stays cheap) and short HTTP
    deadlines (the slow-client tests stay short)."""
    running = start_background_server(
        tiny_model_dir,
        backend,
        http_port=0,
        max_wait_ms=1.0,
        limits=Limits(max_batch_tokens=128, max_tokens_per_request=128, max_message_bytes=2**20),
        http_header_timeout_s=HEADER_TIMEOUT,
        http_body_timeout_s=BODY_TIMEOUT,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(guarded) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(guarded.address) as open_channel:
        yield open_channel


@pytest.fixture(scope="module")
def http(guarded) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded.http_url, timeout=30) as client:
        yield client


def raw_unary(channel: grpc.Channel, path: str) -> grpc.UnaryUnaryMultiCallable:
    """A method taking and returning bytes as they are: anything can be sent."""
    return channel.unary_unary(path, request_serializer=None, response_deserializer=None)


def grpc_code(call, request) -> grpc.StatusCode:
    try:
        call(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() not in SERVER_FAULTS, (error.code(), error.details())
        return error.code()
    return grpc.StatusCode.OK


def stream_code(channel: grpc.Channel, path: str, messages: list[bytes]) -> grpc.StatusCode:
    call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
    return grpc_code(
        lambda requests, timeout: list(call(iter(requests), timeout=timeout)), messages
    )


def assert_good_grpc_score(channel: grpc.Channel, backend) -> None:
    response = pb.ScoreResponse.FromString(
        raw_unary(channel, "/teacher.v1.Teacher/Score")(
            UNARY["/teacher.v1.Teacher/Score"].SerializeToString(), timeout=30
        )
    )
    expected = reference_logprobs(backend, GOOD_IDS)[1:4].numpy()[np.arange(3), GOOD_IDS[2:]]
    target = np.frombuffer(response.results[0].target_logprobs.data, "<f4")
    np.testing.assert_allclose(target, expected, atol=1e-5)


def assert_good_http_score(http: httpx.Client, backend) -> None:
    answer = http.post("/v1/score", json=GOOD_SCORE)
    assert answer.status_code == 200, answer.text
    expected = reference_logprobs(backend, GOOD_IDS)[1:4].numpy()[np.arange(3), GOOD_IDS[2:]]
    np.testing.assert_allclose(answer.json()["results"][0]["target_logprobs"], expected, atol=1e-5)


def error_text(route: str, answer: httpx.Response) -> str:
    """The error message in the route's dialect shape (asserting that shape)."""
    assert answer.headers["content-type"].startswith("application/json"), answer.text
    error = answer.json()["error"]
    if route.startswith("/v1/") and "completions" in route:  # OpenAI: {"error": {"message",
        # "type", "param", "code"}}; vLLM's 404 for the model and 400 for the chat template
        kinds = {404: {"NotFoundError"}, 400: {"BadRequestError", "invalid_request_error"}}
        kind = kinds.get(answer.status_code, {"invalid_request_error"})
        assert error["code"] == answer.status_code and error["type"] in kind
        return error["message"]
    if route in ("/", "/generate"):  # TGI: {"error", "error_type"}
        assert answer.json()["error_type"] == "validation"
        return error
    return error  # native: {"error"}


def post(http: httpx.Client, route: str, payload: bytes, packed: bool) -> httpx.Response:
    content_type = MSGPACK if packed else "application/json"
    return http.post(route, content=payload, headers={"content-type": content_type})


# --- the reproducers ---------------------------------------------------------------------


def test_an_unparseable_message_is_invalid_argument_naming_its_type_on_every_method(
    channel, backend
):
    for path, request in UNARY.items():
        code = grpc_code(raw_unary(channel, path), b"\xff")
        assert code == grpc.StatusCode.INVALID_ARGUMENT, path
        with pytest.raises(grpc.RpcError) as caught:
            raw_unary(channel, path)(b"\xff", timeout=30)
        name = request.DESCRIPTOR.full_name
        assert f"request: not a valid {name} protobuf" in caught.value.details()
    for path in STREAMING:
        assert stream_code(channel, path, [b"\xff"]) == grpc.StatusCode.INVALID_ARGUMENT, path
    assert_good_grpc_score(channel, backend)


def test_an_unparseable_message_is_logged_once_per_client_as_a_warning_without_traceback(
    tiny_model_dir, backend, caplog
):
    running = start_background_server(tiny_model_dir, backend)  # a guard that saw no one yet
    try:
        with caplog.at_level(logging.WARNING), grpc.insecure_channel(running.address) as fresh:
            for _ in range(5):
                for path in ("/teacher.v1.Teacher/Score", "/teacher.v1.Teacher/Generate"):
                    assert grpc_code(raw_unary(fresh, path), b"\xff") != grpc.StatusCode.OK
    finally:
        running.stop()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    warnings = [r for r in caplog.records if r.name == "teacher_service.errors"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    (warning,) = warnings
    assert warning.levelno == logging.WARNING and warning.exc_info is None
    assert "ipv4:127.0.0.1: refused: request: not a valid" in warning.getMessage()


def test_peer_warnings_come_back_after_the_interval_with_the_count_since(caplog):
    warnings = PeerWarnings(every_s=0.2)
    with caplog.at_level(logging.WARNING, logger="teacher_service.errors"):
        for peer in ("ipv4:10.0.0.1:1000", "ipv4:10.0.0.1:2000", "ipv4:10.0.0.1:3000"):
            warnings.warn(peer, "bad")  # one host, three ports: one line
        warnings.warn("ipv6:[::1]:4000", "bad")  # another host: its own line
        time.sleep(0.25)
        warnings.warn("ipv4:10.0.0.1:5000", "bad")
    assert [r.getMessage() for r in caplog.records] == [
        "ipv4:10.0.0.1: bad",
        "ipv6:[::1]: bad",
        "ipv4:10.0.0.1: bad (2 more since the last warning)",
    ]


def test_a_candidate_shape_whose_product_overflows_is_invalid_naming_the_field(
    channel, http, backend
):
    tensor = pb.Tensor(dtype=pb.INT32, shape=[2**32, 2**32])
    request = pb.ScoreRequest(
        sequences=[pb.Sequence(token_ids=[1, 2, 3], score_from=1, candidate_ids=tensor)]
    )
    with pytest.raises(grpc.RpcError) as caught:
        raw_unary(channel, "/teacher.v1.Teacher/Score")(request.SerializeToString(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequences[0].candidate_ids" in caught.value.details()
    shapes = [[2**64 - 1], [2**63], [0, 2**62], [1] * 40]  # msgpack's ints end at 2**64 - 1
    for packed, shape in [(True, shape) for shape in shapes] + [
        (False, [2**64]),
        (False, [1] * 40),
    ]:
        candidates = {"dtype": "int32", "shape": shape, "data": b"" if packed else ""}
        sequence = {"token_ids": [1, 2, 3], "score_from": 1, "candidate_ids": candidates}
        payload = (msgpack.packb if packed else json.dumps)({"sequences": [sequence]})
        answer = post(http, "/v1/score", payload, packed)
        assert answer.status_code == 422, (shape, answer.text)
        assert "sequences[0].candidate_ids" in answer.json()["error"], answer.text
    assert_good_grpc_score(channel, backend)


@pytest.mark.parametrize(
    "shape, says",
    [
        ([2**32, 2**32], "bytes do not hold shape"),  # int64 product wraps to 0
        ([2**62, 4], "bytes do not hold shape"),  # wraps to 0 as well
        ([0, 2**62], "too big"),  # 0 elements, yet more than numpy can address
        ([1] * 40, "dimensions"),  # more than numpy holds
    ],
)
def test_decoding_an_absurd_shape_is_a_codec_error(shape, says):
    with pytest.raises(CodecError, match=says):
        decode_numpy(pb.Tensor(dtype=pb.INT32, shape=shape, data=b""))


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_get_a_4xx_in_the_dialects_shape_naming_the_field(http, backend, value):
    cases = {
        "/v1/score": [
            ('{"sequences": [{"token_ids": [1, %s, 3], "score_from": 1}]}', "token_ids"),
            ('{"sequences": [{"token_ids": [1, 2, 3], "score_from": 1}], "top_k": %s}', "top_k"),
        ],
        "/v1/generate": [('{"prompts": [{"token_ids": [1, %s]}]}', "token_ids")],
        "/v1/completions": [
            ('{"prompt": [1, %s]}', "prompt"),
            ('{"prompt": [1, 2], "top_k": %s}', "top_k"),
        ],
        "/v1/chat/completions": [
            ('{"messages": [{"role": "user", "content": %s}]}', "messages[0].content"),
            (
                '{"messages": [{"role": "user", "content": "a"}], "top_p": %s}',
                "top_p",
            ),
        ],
        "/generate": [('{"inputs": "a", "parameters": {"top_k": %s}}', "top_k")],
        "/": [('{"inputs": %s}', "inputs")],
    }
    for route, bodies in cases.items():
        for template, field in bodies:
            answer = post(http, route, (template % value).encode(), False)
            assert 400 <= answer.status_code < 500, (route, template, answer.text)
            assert field in error_text(route, answer), (route, answer.text)
    number = float(value.replace("Infinity", "inf"))
    packed = msgpack.packb({"sequences": [{"token_ids": [1, number], "score_from": 1}]})
    answer = post(http, "/v1/score", packed, True)
    assert answer.status_code == 422 and "token_ids" in answer.json()["error"], answer.text
    assert_good_http_score(http, backend)


def test_a_body_nested_too_deeply_gets_a_4xx_on_every_route(http, backend):
    for route, (_, takes_msgpack) in ROUTES.items():
        for packed in (False, True) if takes_msgpack else (False,):
            payload = b"\x91" * 100_000 if packed else b"[" * 100_000
            answer = post(http, route, payload, packed)
            assert answer.status_code == 400, (route, packed, answer.text)
            assert "body: nested too deeply" in error_text(route, answer)
            # deep but decodable: the schema refuses it, and the error does not echo it
            payload = b"[" * 800 + b"]" * 800
            answer = post(http, route, payload, False)
            assert answer.status_code == 422, (route, answer.text)
    assert_good_http_score(http, backend)


def test_lone_surrogates_anywhere_in_a_body_never_get_a_5xx(http):
    """JSON can carry "\\ud800", which no UTF-8 answer can: in a key, a value, an echo."""
    lone = "\ud800"
    bodies = {
        "/v1/score": [{lone: 1}, {**GOOD_SCORE, "request_id": lone}],
        "/v1/generate": [{**ROUTES["/v1/generate"][0], "request_id": lone}],
        "/v1/completions": [
            {lone: 1},
            {"prompt": lone, "max_tokens": 1, "echo": True},
            {"prompt": "Ada", "max_tokens": 2, "stop": [lone]},
            {"prompt": [1, 5], "max_tokens": 1, "logit_bias": {lone: 1.0}},
        ],
        "/v1/chat/completions": [
            {lone: 1},
            {"messages": [{"role": lone, "content": lone}], "chat_template": CHAT_TEMPLATE},
            {"messages": [{"role": "user", lone: "a"}], "chat_template": lone},
        ],
        "/generate": [{"inputs": lone}, {"inputs": "Ada", "parameters": {"stop": [lone]}}],
        "/": [{lone: 1}],
    }
    for route, payloads in bodies.items():
        for payload in payloads:
            answer = post(http, route, json.dumps(payload).encode(), False)
            assert answer.status_code < 500, (route, ascii(payload), answer.text)
            assert answer.status_code == 200 or error_text(route, answer)


# --- fuzzing -------------------------------------------------------------------------------

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["\ud800", "a\udfffb", "\x00"]))
# the values that broke things before: weighted up by having a branch of their own
SPECIAL = [math.nan, math.inf, -math.inf, 0, -1, 2**31, 2**63, 2**64, "", "\ud800", 1e308]
SCALARS = st.one_of(
    st.sampled_from(SPECIAL),
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
TENSORS = st.builds(
    pb.Tensor,
    dtype=st.integers(-2, 8),
    shape=st.lists(INT64 | st.integers(0, 4), max_size=4),
    data=st.binary(max_size=32),
)
SEQUENCES = st.builds(
    lambda ids, score_from, candidates: pb.Sequence(
        token_ids=ids, score_from=score_from, candidate_ids=candidates
    ),
    st.lists(INT32 | st.integers(0, 600), max_size=12),
    INT32 | st.integers(0, 12),
    st.none() | TENSORS,
)
SCORE_REQUESTS = st.builds(
    pb.ScoreRequest,
    sequences=st.lists(SEQUENCES, max_size=3),
    top_k=INT32 | st.integers(0, 600),
    full=st.booleans(),
    temperature=st.none() | FLOATS,
    dtype=st.integers(-2, 8),
    request_id=st.text(max_size=8),
)
GENERATE_REQUESTS = st.builds(
    pb.GenerateRequest,
    prompts=st.lists(
        st.builds(pb.Prompt, token_ids=st.lists(INT32 | st.integers(0, 600), max_size=8)),
        max_size=3,
    ),
    max_new_tokens=INT32 | st.integers(0, 8),
    temperature=st.none() | FLOATS,
    top_p=st.none() | FLOATS,
    seed=st.none() | st.integers(0, 2**64 - 1),
    ignore_eos=st.booleans(),
)


def paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key / index path into a JSON value, the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths(child, (*prefix, index))


def replaced(value: Any, path: tuple, new: Any) -> Any:
    """A copy of `value` with the thing at `path` replaced by `new` (None deletes a key)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        out = {**value, head: replaced(value[head], rest, new)}
        return {k: v for k, v in out.items() if not (k == head and not rest and new is None)}
    return [replaced(child, rest, new) if i == head else child for i, child in enumerate(value)]


@st.composite
def mutated_bodies(draw) -> tuple[str, bytes, bool]:
    """A route's good body with one part replaced by anything (or deleted), a key added,
    or bytes that are no body at all; in JSON, or msgpack where the route takes it."""
    route = draw(st.sampled_from(sorted(ROUTES)))
    good, takes_msgpack = ROUTES[route]
    packed = takes_msgpack and draw(st.booleans())
    kind = draw(st.sampled_from(["replace", "add", "bytes"]))
    if kind == "bytes":
        return route, draw(st.binary(max_size=64)), packed
    if kind == "replace":
        body = good
        for _ in range(draw(st.integers(1, 3))):
            body = replaced(body, draw(st.sampled_from(list(paths(body)))), draw(JSON_VALUES))
    else:
        body = {**good, draw(TEXT): draw(JSON_VALUES)}
    if packed:
        try:
            return route, msgpack.packb(body, unicode_errors="surrogatepass"), packed
        except OverflowError:  # msgpack's integers end at 64 bits: send this one as JSON
            pass
    return route, json.dumps(body).encode(), False


@FUZZ
@given(request=mutated_bodies())
def test_fuzzed_json_and_msgpack_bodies_never_get_a_5xx(http, request):
    route, payload, packed = request
    answer = post(http, route, payload, packed)
    assert answer.status_code < 500, (route, payload[:200], answer.text)
    if answer.status_code >= 400:
        assert error_text(route, answer)


def test_after_the_http_fuzzing_a_good_request_is_served_correctly(http, backend):
    assert_good_http_score(http, backend)


@FUZZ
@given(
    path=st.sampled_from(sorted(UNARY)),
    payload=st.one_of(
        st.binary(max_size=48),
        st.tuples(st.sampled_from(sorted(UNARY)), st.integers(0, 64), st.binary(max_size=4)).map(
            lambda edit: _spliced(*edit)
        ),
    ),
)
def test_fuzzed_protobuf_bytes_never_get_internal_or_unknown(channel, path, payload):
    grpc_code(raw_unary(channel, path), payload)


def _spliced(path: str, at: int, junk: bytes) -> bytes:
    """A valid request's bytes with `junk` written over them at `at`."""
    data = UNARY[path].SerializeToString()
    return data[:at] + junk + data[at + len(junk) :]


@FUZZ
@given(score=SCORE_REQUESTS, generate=GENERATE_REQUESTS)
def test_fuzzed_wellformed_but_wrong_messages_never_get_internal_or_unknown(
    channel, score, generate
):
    grpc_code(raw_unary(channel, "/teacher.v1.Teacher/Score"), score.SerializeToString())
    grpc_code(raw_unary(channel, "/teacher.v1.Teacher/Generate"), generate.SerializeToString())
    score.request_id = "fuzzed"
    answer = stream_code(channel, "/teacher.v1.Teacher/ScoreStream", [score.SerializeToString()])
    assert answer == grpc.StatusCode.OK  # a stream answers a bad request in-stream


def test_after_the_grpc_fuzzing_a_good_request_is_served_correctly(channel, backend):
    assert_good_grpc_score(channel, backend)


# --- connection hygiene --------------------------------------------------------------------


def read_until_closed(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(4096):
        out += chunk
    return out


def test_a_slow_header_client_is_closed_within_the_timeout_while_others_are_served(
    guarded, http, backend
):
    port = guarded.running.http_port
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.settimeout(10)
        started = time.monotonic()
        slow.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\n")
        assert_good_http_score(http, backend)  # served meanwhile
        # a header line every 0.1 s, until the server answers: it does not extend the deadline
        while not select.select([slow], [], [], 0.1)[0]:
            assert time.monotonic() - started < HEADER_TIMEOUT + 5, "never closed"
            slow.sendall(b"X-Slow: 1\r\n")
        closed_after = time.monotonic() - started
        answer = read_until_closed(slow)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert HEADER_TIMEOUT - 0.05 <= closed_after < HEADER_TIMEOUT + 1.0, closed_after
    assert_good_http_score(http, backend)


def test_a_silent_connection_is_closed_without_an_answer_after_the_header_timeout(guarded):
    with socket.create_connection(("127.0.0.1", guarded.running.http_port)) as silent:
        silent.settimeout(10)
        started = time.monotonic()
        assert read_until_closed(silent) == b""
        assert HEADER_TIMEOUT - 0.05 <= time.monotonic() - started < HEADER_TIMEOUT + 1.0


def test_a_slow_body_client_gets_408_within_the_body_timeout(guarded, http, backend):
    with socket.create_connection(("127.0.0.1", guarded.running.http_port)) as slow:
        slow.settimeout(10)
        slow.sendall(
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 1000\r\n\r\n{"
        )
        started = time.monotonic()
        answer = read_until_closed(slow)
        closed_after = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request body" in answer, answer
    assert BODY_TIMEOUT - 0.05 <= closed_after < BODY_TIMEOUT + 1.0, closed_after
    assert_good_http_score(http, backend)


def test_past_the_connection_cap_a_request_gets_503_until_a_connection_closes(
    tiny_model_dir, backend
):
    cap = 3
    running = start_background_server(
        tiny_model_dir, backend, grpc=False, http_port=0, http_max_connections=cap
    )
    url = running.http_url
    clients = [httpx.Client(base_url=url, timeout=10) for _ in range(cap)]
    try:
        for client in clients:  # each keeps its connection open (keep-alive)
            assert client.get("/health").status_code == 200
        refused = httpx.get(f"{url}/health", timeout=10)  # one past the cap
        assert refused.status_code == 503 and refused.headers["connection"] == "close"
        assert clients[0].get("/health").status_code == 200  # those within it are served
        clients.pop().close()
        deadline = time.monotonic() + 5
        while httpx.get(f"{url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "closing a connection did not free the cap"
            time.sleep(0.05)
    finally:
        for client in clients:
            client.close()
        running.stop()


def test_serve_takes_the_http_hygiene_flags(monkeypatch, tiny_model_dir):
    from teacher_service import cli, server

    seen = []
    monkeypatch.setattr(server, "serve", seen.append)
    flags = ["--http-header-timeout-s", "2.5", "--http-body-timeout-s", "30"]
    cli.main(["serve", "--model", str(tiny_model_dir), *flags, "--http-max-connections", "7"])
    (config,) = seen
    assert (config.http_header_timeout_s, config.http_body_timeout_s) == (2.5, 30.0)
    assert config.http_max_connections == 7
    with pytest.raises(ValueError, match="http_body_timeout_s must be > 0"):
        type(config)(model="m", http_body_timeout_s=0)
