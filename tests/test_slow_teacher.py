"""The slow-teacher rig: a real model whose trainer-sized request takes about a second on
2 CPU cores (distill_lab.tiny_model.SLOW_TEACHER_SPEC, real compute), served with the
default flags, as a real teacher's forwards take seconds on its hardware.

Nothing here asserts a time: a loaded machine slows everything. What is asserted is what
the defaults must never do to a slow teacher (the second wave's absolute 0.1 s bounds did
all three): refuse a lone caller, lose the batching across callers, fail a trainer.
bench/bench_slow_teacher.py measures the rest (latency, fairness, throughput)."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from distill_lab.tiny_model import SLOW_TEACHER_SPEC, build_tiny_model
from student_trainer.train import train
from teacher_client import TeacherClient
from teacher_service.backend import HFBackend
from teacher_service.backend_api import ScoreItem
from teacher_service.scoring import ScoreOptions
from tests.conftest import start_background_server
from tests.trainer_helpers import small_config

pytestmark = pytest.mark.timeout(300)
SEQUENCES, LENGTH = 6, 256  # a trainer's request: about a second of this model's time here


@pytest.fixture(scope="module")
def slow_backend(tmp_path_factory, tiny_model_dir) -> HFBackend:
    model_dir = build_tiny_model(
        tmp_path_factory.mktemp("slow-teacher"), SLOW_TEACHER_SPEC, tokenizer_from=tiny_model_dir
    )
    return HFBackend.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def slow_server(slow_backend, tiny_model_dir):
    running = start_background_server(tiny_model_dir, slow_backend)  # every flag its default
    yield running
    running.stop()


def _calls(count: int, seed: int, vocab: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "sequences": [[rng.randrange(vocab) for _ in range(LENGTH)] for _ in range(SEQUENCES)],
            "score_from": 1,
            "top_k": 8,
        }
        for _ in range(count)
    ]


def _counts(server) -> tuple[int, int, int]:
    """(forwards, sequences in them, requests refused) so far."""
    stats = server.running.engine.batcher.stats
    return stats.batches, stats.sequences, stats.refused


def _since(server, before: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(now - then for now, then in zip(_counts(server), before))


def test_a_lone_stream_caller_and_a_lone_unary_caller_are_never_refused(slow_server, slow_backend):
    calls = _calls(6, seed=0, vocab=slow_backend.vocab_size)
    before = _counts(slow_server)
    with TeacherClient(slow_server.address, timeout=600) as client:
        streamed = list(client.score_stream(calls, window=4))
        unary = [client.score(**call) for call in calls[:2]]
    assert _since(slow_server, before)[2] == 0  # not even a refusal the client resent
    assert len(streamed) == 6 and all(len(results) == SEQUENCES for results in streamed)
    # the scores are the model's: the first sequence against a forward in this process
    ids = torch.tensor(calls[0]["sequences"][0])
    (expected,) = slow_backend.score_batch([ScoreItem(ids, 1, ScoreOptions(top_k=8))]).scores
    for results in (streamed[0], unary[0]):
        assert results[0].topk_ids.tolist() == expected.topk_ids.tolist()
        np.testing.assert_allclose(
            results[0].target_logprobs, expected.target_logprobs.numpy(), rtol=1e-5, atol=1e-5
        )


def test_four_callers_share_their_forwards_and_none_is_refused(slow_server, slow_backend):
    vocab = slow_backend.vocab_size
    before = _counts(slow_server)
    with TeacherClient(slow_server.address, timeout=600) as client:
        for call in _calls(2, seed=1, vocab=vocab):
            client.score(**call)
    forwards, sequences, refused = _since(slow_server, before)
    alone = sequences / forwards
    assert refused == 0 and alone == SEQUENCES  # one caller: its own request per forward

    answered: list[int] = []
    start = threading.Barrier(4)

    def caller(seed: int) -> None:
        with TeacherClient(slow_server.address, timeout=600) as client:
            start.wait()
            for call in _calls(4, seed=seed, vocab=vocab):
                answered.append(len(client.score(**call)))

    before = _counts(slow_server)
    threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(2, 6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    forwards, sequences, refused = _since(slow_server, before)
    assert answered == [SEQUENCES] * 16 and refused == 0
    # the four callers' requests ride in the same forwards (all but the first and the last
    # hold four requests: 96 sequences in 5 forwards); 0.1 s bounds ran one sequence each
    assert sequences / forwards >= 3 * alone


def test_two_trainers_finish_against_one_slow_teacher(slow_server, student_model_dir, tmp_path):
    results: dict[int, object] = {}

    def run(n: int) -> None:
        config = small_config(
            tmp_path / f"run-{n}",
            student_model_dir,
            f"teacher.address={slow_server.address}",
            "optim.steps=3",
            "optim.batch_size=16",  # a request of about 1k tokens: a second of the teacher's
            "rollout.max_new_tokens=48",
            f"run.seed={n}",
        )
        results[n] = train(config)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [0, 1]
    assert all(result.steps == 3 for result in results.values())
