"""ScoreStreams of interleaved valid, invalid (bad field values) and undecodable messages
end promptly with the contract's answers and status (tests/stream_mix.py), never a hang,
and the service stays up. An undecodable message arriving while an answer is being written
once made grpc.aio's abort fail (TOO_MANY_OPERATIONS), leaving the stream open until the
client's deadline: several streams run at once here so that writes and reads overlap.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teacher_service.config import Limits
from teacher_service.server import BackgroundServer
from tests.conftest import start_background_server
from tests.stream_mix import (
    INVALID,
    UNDECODABLE,
    encode,
    expected,
    is_undecodable,
    run_stream,
)

HANG_S = 30.0  # a stream without its status by then hung (a healthy one takes milliseconds)
PARALLEL = 4  # copies of each example's stream at once
pytestmark = pytest.mark.timeout(180)

kinds = st.sampled_from(["valid", "bad", "undecodable"])
mixes = st.lists(st.tuples(kinds, st.integers(0, 99)), min_size=1, max_size=6)
garbage = st.binary(min_size=1, max_size=24).filter(is_undecodable)


@pytest.fixture(scope="module")
def fuzzed(tiny_model_dir, backend) -> Iterator[BackgroundServer]:
    # admission off: a valid message's answer is its scores, never back-pressure
    limits = Limits(max_queue_forwards=math.inf)
    running = start_background_server(tiny_model_dir, backend, max_wait_ms=1.0, limits=limits)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(fuzzed) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzzed.address) as open_channel:
        yield open_channel


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(mix=mixes, noise=garbage)
def test_a_mixed_stream_gets_its_answers_then_its_status_and_never_hangs(channel, mix, noise):
    messages = [encode(kind, n, choice) for n, (kind, choice) in enumerate(mix)]
    # one undecodable message of each mix is hypothesis's own bytes, not a template
    first = next((n for n, (kind, _) in enumerate(mix) if kind == "undecodable"), None)
    if first is not None:
        messages[first] = noise
    answers, status = expected([kind for kind, _ in mix])
    with ThreadPoolExecutor(PARALLEL) as pool:
        outcomes = list(pool.map(lambda _: run_stream(channel, messages, HANG_S), range(PARALLEL)))
    for outcome in outcomes:
        assert outcome.code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{mix}: the stream hung"
        assert (outcome.answers, outcome.code) == (answers, status), (mix, outcome.details)
        if status == INVALID:
            assert "request: not a valid teacher.v1.ScoreRequest protobuf" in outcome.details


def test_garbage_while_answers_are_written_logs_no_traceback_and_the_service_serves_on(
    channel, caplog
):
    """Many valid messages then garbage: the garbage arrives while answers are in flight."""
    messages = [encode("valid", n, n) for n in range(16)] + [UNDECODABLE[0]]
    answers, status = expected(["valid"] * 16 + ["undecodable"])
    with caplog.at_level(logging.WARNING), ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: run_stream(channel, messages, HANG_S), range(32)))
    assert all((o.answers, o.code) == (answers, status) for o in outcomes)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if r.exc_info]
    after = run_stream(channel, [encode("valid", n, n) for n in range(3)], HANG_S)
    assert (after.answers, after.code) == expected(["valid"] * 3)
