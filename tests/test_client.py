"""Client behaviour: the tokenizer handshake, retries on UNAVAILABLE, deadlines, Info."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from transformers import AutoTokenizer

from student_trainer.tiny_model import train_tokenizer
from teacher_client import (
    RetryPolicy,
    TeacherClient,
    TeacherServiceError,
    TokenizerMismatchError,
)
from teacher_client.fingerprint import tokenizer_fingerprint
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
        retry = RetryPolicy(max_retries=30, initial_backoff=0.05, max_backoff=0.2)
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
