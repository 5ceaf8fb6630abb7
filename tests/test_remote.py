"""Remote backends against a real HTTP peer: this project's own server speaking each dialect.

Upstream: the session server (local model) over HTTP. In front of it: a second service
whose backend is an OpenAIBackend or TGIBackend pointed at the upstream's URL. Its gRPC
answers must equal the upstream's own gRPC answers for what the dialect can carry, and
everything else must be refused naming the missing capability.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from teacher_client import TeacherClient, TeacherServiceError
from teacher_service.backend_api import Backend
from teacher_service.remote import OpenAIBackend, TGIBackend
from tests.conftest import start_background_server


@pytest.fixture(scope="module", params=["openai", "tgi"])
def remote(request, http_url, tokenizer, tiny_model_dir):
    """(backend name, a gRPC client of the service fronting the upstream)."""
    backend_class = {"openai": OpenAIBackend, "tgi": TGIBackend}[request.param]
    backend = backend_class(http_url, tokenizer, timeout=60)
    running = start_background_server(tiny_model_dir, backend, max_wait_ms=2.0)
    with TeacherClient(running.address, timeout=60) as client:
        yield request.param, client
    running.stop()


def test_remote_backends_provide_the_backend_contract(http_url, tokenizer):
    for backend_class in (OpenAIBackend, TGIBackend):
        backend = backend_class(http_url, tokenizer, timeout=60)
        assert isinstance(backend, Backend)
        assert not backend.samples_while_scoring  # the upstream samples, from the seed


def test_target_logprobs_equal_the_local_backend(remote, client, sequences):
    _, front = remote
    got = front.score(sequences, 2, top_k=0)
    want = client.score(sequences, 2, top_k=0)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.target_logprobs, w.target_logprobs, atol=1e-5)


@pytest.mark.parametrize("remote", ["openai"], indirect=True)
def test_topk_through_openai(remote, client, sequences):
    _, front = remote
    got = front.score(sequences, 1, top_k=40, dtype="float16")
    want = client.score(sequences, 1, top_k=40, dtype="float16")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.topk_ids, w.topk_ids)
        np.testing.assert_array_equal(g.topk_logprobs, w.topk_logprobs)


@pytest.mark.parametrize("remote", ["tgi"], indirect=True)
def test_topk_refused_by_tgi(remote, sequences):
    _, front = remote
    with pytest.raises(TeacherServiceError) as error:
        front.score(sequences, 1, top_k=5)
    assert error.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert "'topk' capability" in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "capability"),
    [
        ({"candidates": [3, 4, 5]}, "candidates"),
        ({"full": True}, "full"),
        ({"temperature": 0.7}, "temperature"),
    ],
)
def test_what_the_upstream_cannot_give_is_refused(remote, sequences, kwargs, capability):
    _, front = remote
    with pytest.raises(TeacherServiceError) as error:
        front.score(sequences[:1], 1, top_k=0, **kwargs)
    assert error.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert f"'{capability}' capability" in str(error.value)


def test_info_reports_the_backend_and_its_capabilities(remote, client):
    name, front = remote
    info, local = front.info(), client.info()
    assert info.backend == name
    assert info.tokenizer_fingerprint == local.tokenizer_fingerprint
    assert info.vocab_size == local.vocab_size
    assert (
        set(info.capabilities)
        == {"openai": {"target", "topk", "ranks", "generate"}, "tgi": {"target", "generate"}}[name]
    )


def test_greedy_generation_equals_the_local_backend(remote, client, sequences):
    _, front = remote
    prompts = [s[:5] for s in sequences[:3]]
    got = front.generate(prompts, max_new_tokens=6, temperature=0.0)
    want = client.generate(prompts, max_new_tokens=6, temperature=0.0)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]


def test_sampled_generation_is_drawn_by_the_upstream_from_the_seed(remote, sequences):
    _, front = remote
    prompts = [s[:5] for s in sequences[:2]]
    first = front.generate(prompts, max_new_tokens=4, temperature=0.8, seed=3)
    again = front.generate(prompts, max_new_tokens=4, temperature=0.8, seed=3)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert all(1 <= len(c.token_ids) <= 4 for c in first)


@pytest.mark.parametrize("remote", ["tgi"], indirect=True)
def test_tgi_refuses_ids_that_text_cannot_carry(remote, tokenizer):
    _, front = remote
    # a merged BPE token spelled out one character per token: its text encodes to the merge
    merged = next(t for t in range(3, len(tokenizer)) if len(tokenizer.decode([t])) >= 3)
    text = tokenizer.decode([merged])
    spelled = [i for ch in text for i in tokenizer(ch, add_special_tokens=False)["input_ids"]]
    ids = [tokenizer.bos_token_id, *spelled]
    assert tokenizer(text)["input_ids"] != ids
    with pytest.raises(TeacherServiceError) as error:
        front.score([ids], 1, top_k=0)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequences[0]" in str(error.value)
