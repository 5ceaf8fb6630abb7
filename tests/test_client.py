"""Client behaviour: the tokenizer handshake, retries on UNAVAILABLE, deadlines, Info."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import grpc
import pytest
from transformers import AutoTokenizer

from distill_lab.tiny_model import train_tokenizer
from teacher_client import (
    AsyncTeacherClient,
    RetryPolicy,
    TeacherClient,
    TeacherServiceError,
    TokenizerMismatchError,
)
from teacher_client.fingerprint import tokenizer_fingerprint
from teacher_client.proto import teacher_pb2 as pb
from teacher_client.retry import RETRY_AFTER_KEY
from teacher_service.cli import free_port
from teacher_service.config import ServerConfig
from teacher_service.server import BackgroundServer


def test_info_describes_the_loaded_model(client, backend):
    info = client.info()
    assert info.vocab_size == len(backend.tokenizer) == backend.vocab_size
    assert info.max_seq_len == backend.model.config.max_position_embeddings
    assert info.eos_token_id == backend.tokenizer.eos_token_id
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(backend.tokenizer)
    assert {"target", "topk", "candidates", "full", "ranks", "temperature", "generate"} <= set(
        info.capabilities
    )


def test_tokenizer_handshake_accepts_the_same_tokenizer_loaded_separately(client, tiny_model_dir):
    own_copy = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert client.check_tokenizer(own_copy).model_id == tiny_model_dir.name


def test_tokenizer_handshake_rejects_a_different_tokenizer(client):
    other = train_tokenizer(vocab_size=400, seed=1)
    with pytest.raises(TokenizerMismatchError, match=r"vocabulary size 512 \(teacher\) vs 400"):
        client.check_tokenizer(other)


def test_tokenizer_handshake_rejects_same_size_with_other_tokens(client, backend):
    other = train_tokenizer(vocab_size=512, seed=5)  # another corpus: other merges, same size
    assert len(other) == backend.vocab_size
    with pytest.raises(TokenizerMismatchError, match="different tokens"):
        client.check_tokenizer(other)


def test_unavailable_is_retried_until_the_server_comes_up(tiny_model_dir, backend, sequences):
    port = free_port()
    config = ServerConfig(model=str(tiny_model_dir), port=port)
    late = BackgroundServer(config, backend)
    starter = threading.Timer(1.0, late.start)
    starter.start()
    try:
        # the call's deadline bounds the retries, not their count: a loaded machine's start-up
        # (warm-up forwards included) can outlast 30 tries of 0.2 s
        retry = RetryPolicy(max_retries=1000, initial_backoff=0.05, max_backoff=0.2)
        with TeacherClient(f"127.0.0.1:{port}", retry=retry, timeout=30) as teacher:
            started = time.monotonic()
            (result,) = teacher.score(sequences[:1], 1, top_k=2)
            assert time.monotonic() - started > 0.5  # it really waited for the server
            assert result.topk_ids.shape == (len(sequences[0]) - 1, 2)
    finally:
        starter.join()
        late.stop()


def test_unavailable_gives_up_after_max_retries_and_within_the_deadline():
    port = free_port()  # nothing listens here
    retry = RetryPolicy(max_retries=3, initial_backoff=0.01, max_backoff=0.02)
    with TeacherClient(f"127.0.0.1:{port}", retry=retry, timeout=10) as teacher:
        with pytest.raises(TeacherServiceError) as caught:
            teacher.info()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    with TeacherClient(
        f"127.0.0.1:{port}", retry=RetryPolicy(max_retries=1000), timeout=0.5
    ) as teacher:
        started = time.monotonic()
        with pytest.raises(TeacherServiceError):
            teacher.info()
        assert time.monotonic() - started < 3.0  # the deadline bounds all retries together


def test_retry_policy_only_retries_unavailable():
    class Error(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

    policy = RetryPolicy(max_retries=2, initial_backoff=0.1, max_backoff=0.15)
    assert policy.next_delay(Error(grpc.StatusCode.INVALID_ARGUMENT), 0, None) is None
    assert 0 <= policy.next_delay(Error(grpc.StatusCode.UNAVAILABLE), 1, None) <= 0.15
    assert policy.next_delay(Error(grpc.StatusCode.UNAVAILABLE), 2, None) is None


def test_a_client_recovers_soon_after_its_teacher_restarts(tiny_model_dir, backend, sequences):
    port = free_port()
    config = ServerConfig(model=str(tiny_model_dir), port=port)
    retry = RetryPolicy(max_retries=1000, initial_backoff=0.05, max_backoff=0.2)
    with TeacherClient(f"127.0.0.1:{port}", retry=retry, timeout=30) as teacher:
        first = BackgroundServer(config, backend).start()
        (before,) = teacher.score(sequences[:1], 1, top_k=2)
        first.stop()
        with pytest.raises(TeacherServiceError):
            teacher.info(timeout=0.5)  # down: the channel has seen its connection fail
        restarted = BackgroundServer(config, backend)
        threading.Timer(3.0, restarted.start).start()
        try:
            (after,) = teacher.score(sequences[:1], 1, top_k=2)
            up_at = time.monotonic()
            assert restarted.running is not None
        finally:
            while restarted.running is None:
                time.sleep(0.05)
            restarted.stop()
    assert (after.topk_ids == before.topk_ids).all()
    # reconnection is paced like the retries (<= 0.2 s apart); gRPC's default backoff
    # (1 s, 1.6 s, 2.6 s, ...) would find the restarted server about 2 s late
    assert up_at - restarted.started_at < 1.0


def refusal(code: grpc.StatusCode, details: str, retry_after: str | None = None):
    trailing = grpc.aio.Metadata(*([(RETRY_AFTER_KEY, retry_after)] if retry_after else []))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details)


class ScriptedStub:
    """A Teacher stub whose Info fails with the scripted errors, in order, then answers."""

    def __init__(self, errors, flavour: str) -> None:
        self.errors, self.flavour, self.calls = list(errors), flavour, 0

    def Info(self, request, timeout=None, metadata=None):  # gRPC's method name
        self.calls += 1
        if self.flavour == "sync":
            return self._answer()

        async def answer():
            return self._answer()

        return answer()

    def _answer(self):
        if self.errors:
            raise self.errors.pop(0)
        return pb.InfoResponse(vocab_size=7)


def outage_lines(records) -> tuple[list[str], list[str]]:
    messages = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    return [m for m in messages if "unavailable" in m], [m for m in messages if "back" in m]


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_an_outage_is_logged_once_per_ten_seconds_and_its_end_once(flavour, caplog):
    retry = RetryPolicy(max_retries=None, initial_backoff=0.001, max_backoff=0.002)
    client_class = TeacherClient if flavour == "sync" else AsyncTeacherClient
    # the async client's channel belongs to the loop current when it is made: one loop for
    # the whole test (an earlier test may have left none set)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    client = client_class("127.0.0.1:1", retry=retry, timeout=60)  # nothing is dialled
    down = [refusal(grpc.StatusCode.UNAVAILABLE, "failed to connect\nto all addresses")] * 20
    busy = [refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry_after="0.001")] * 3
    client._stub = ScriptedStub(down + busy, flavour)

    def info():
        if flavour == "sync":
            return client.info()
        return loop.run_until_complete(client.info())

    with caplog.at_level(logging.DEBUG, logger="teacher_client"):
        started = time.monotonic()
        assert info().vocab_size == 7  # 20 outage retries, then 3 back-pressure ones
        waited = time.monotonic() - started
        assert client._stub.calls == 24
        assert info().vocab_size == 7  # a healthy call says nothing
    unavailable, back = outage_lines(caplog.records)
    assert len(unavailable) == 1
    assert re.fullmatch(  # 60 s, less what the first tries took (a slow machine: 59)
        r"teacher service at 127\.0\.0\.1:1 unavailable \(failed to connect to all "
        r"addresses\); retrying for up to (59|60) s more",
        unavailable[0],
    )
    assert len(back) == 1 and back[0].startswith("teacher service at 127.0.0.1:1 is back after")
    assert 0 <= float(re.search(r"after ([\d.]+) s", back[0]).group(1)) <= waited + 0.05
    busy_lines = [r.getMessage() for r in caplog.records if "busy" in r.getMessage()]
    assert len(busy_lines) == 3  # back-pressure: DEBUG only, each retry
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "busy" in r.getMessage())
    # a second outage within the ten seconds: no new warning, and its end only at DEBUG
    caplog.clear()
    client._stub.errors = [refusal(grpc.StatusCode.UNAVAILABLE, "connection refused")] * 3
    with caplog.at_level(logging.DEBUG, logger="teacher_client"):
        info()
    assert outage_lines(caplog.records) == ([], [])
    assert any("is back after" in r.getMessage() for r in caplog.records)  # as DEBUG
    # once the interval has passed, the next outage warns again (once)
    caplog.clear()
    client.outage.every = 0.5
    time.sleep(0.5)
    client._stub.errors = [refusal(grpc.StatusCode.UNAVAILABLE, "connection refused")] * 3
    info()
    unavailable, back = outage_lines(caplog.records)
    assert len(unavailable) == 1 and "(connection refused)" in unavailable[0]
    assert len(back) == 1
    if flavour == "sync":
        client.close()
    else:
        loop.run_until_complete(client.close())
    asyncio.set_event_loop(None)
    loop.close()
