"""Batch-invariant scoring (`serve --deterministic`, `teacher.deterministic` in-process): a
sequence's log-probs are the same bytes whatever shares its forward: batch sizes, other
sequences' lengths, packing, a shared prefix, other clients, the order of arrival.

Every check compares the bytes of one sequence's answer scored alone with its answer from
inside many different company: target, top-k ids and log-probs, candidates and the full
row."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from teacher_client import ScoreOptions, TeacherClient
from teacher_service import scoring
from teacher_service.backend import HFBackend
from teacher_service.backend_api import ScoreItem
from teacher_service.config import ServerConfig
from teacher_service.in_process import InProcessTeacher
from teacher_service.server import load_backend
from tests.conftest import start_background_server

OPTIONS = ScoreOptions(top_k=5, full=True)
FIELDS = ("target_logprobs", "topk_ids", "topk_logprobs", "full_logprobs")


@pytest.fixture(scope="module")
def deterministic(tiny_model_dir) -> HFBackend:
    return HFBackend.load(tiny_model_dir, device="cpu", dtype="float32", deterministic=True)


def item(sequence: list[int], start: int = 1) -> ScoreItem:
    options = scoring.ScoreOptions.from_client(OPTIONS)
    return ScoreItem(torch.tensor(sequence), start, options)


def as_bytes(scores) -> dict[str, bytes]:
    """The answer's bytes, field by field (torch tensors or numpy arrays)."""
    out = {}
    for name in FIELDS:
        value = getattr(scores, name)
        array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        out[name] = array.tobytes()
    return out


def companies(sequences: list[list[int]], target: list[int]) -> list[list[list[int]]]:
    """Batches holding `target` among others: sizes 2 to 8, longer and shorter company,
    samples sharing its prefix, and the target at every position."""
    rng = random.Random(0)
    shared = [target[: len(target) // 2] + s[1:4] for s in sequences[:4]]  # its first half
    short = [s[:3] for s in sequences]  # packable beside it
    batches = []
    for size in (1, 3, 7):
        others = rng.sample([*sequences, *shared, *short], size)
        for at in (0, size // 2, size):
            batches.append([*others[:at], target, *others[at:]])
    batches.append([*shared, target, *shared])
    batches.append([*short, target])
    return batches


def test_a_deterministic_backend_scores_a_sequence_the_same_in_any_batch(deterministic, sequences):
    target = sequences[2]
    alone = as_bytes(deterministic.score_batch([item(target)]).scores[0])
    for batch in companies(sequences, target):
        scored = deterministic.score_batch([item(s) for s in batch]).scores
        found = [as_bytes(scores) for s, scores in zip(batch, scored) if s == target]
        assert found and all(answer == alone for answer in found), f"in a batch of {len(batch)}"


def test_the_default_mode_is_not_batch_invariant_so_the_check_can_fail(backend, sequences):
    """The control: batched as usual (padded, packed, shared), the same sequence's bytes
    move with its company (on this machine, in all 11 companies), which is what the mode
    above removes."""
    target = sequences[2]
    alone = as_bytes(backend.score_batch([item(target)]).scores[0])
    moved = 0
    for batch in companies(sequences, target):
        scored = backend.score_batch([item(s) for s in batch]).scores
        moved += any(as_bytes(a) != alone for s, a in zip(batch, scored) if s == target)
    assert moved > 0


def test_its_answers_are_the_default_modes_to_float_rounding(deterministic, backend, sequences):
    """The same semantics: only which kernels compute them may differ in the last bits."""
    batch = [item(s) for s in sequences]
    exact = deterministic.score_batch(batch).scores
    batched = backend.score_batch(batch).scores
    for got, expected in zip(exact, batched):
        torch.testing.assert_close(got.full_logprobs, expected.full_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.target_logprobs, expected.target_logprobs, atol=1e-5, rtol=0)


def test_the_forward_tokens_are_each_sequence_alone(deterministic, sequences):
    items = [item(s) for s in sequences]
    tokens = deterministic.score_batch(items).forward_tokens
    assert tokens.computed == sum(i.forward_len for i in items)  # one unpadded row each
    assert tokens.padding == 0


def test_a_served_deterministic_teacher_answers_the_same_bytes_to_many_clients(
    tiny_model_dir, deterministic, sequences
):
    target = sequences[2]
    running = start_background_server(tiny_model_dir, deterministic, max_wait_ms=20.0)
    try:
        with TeacherClient(running.address, timeout=60) as client:
            (alone,) = client.score([target], 1, OPTIONS)
            expected = as_bytes(alone)
            batches = companies(sequences, target) * 3

            def call(batch: list[list[int]]) -> list[dict[str, bytes]]:
                answers = client.score(batch, 1, OPTIONS)
                return [as_bytes(a) for s, a in zip(batch, answers) if s == target]

            with ThreadPoolExecutor(8) as pool:  # concurrent callers: mixed forwards
                found = [a for answers in pool.map(call, batches) for a in answers]
            streamed = list(
                client.score_stream(
                    [dict(sequences=b, score_from=1, options=OPTIONS) for b in batches[:6]]
                )
            )
    finally:
        running.stop()
    found += [
        as_bytes(a)
        for b, answers in zip(batches, streamed)
        for s, a in zip(b, answers)
        if s == target
    ]
    assert len(found) >= len(batches) and all(answer == expected for answer in found)


def test_the_in_process_teacher_has_the_same_mode(tiny_model_dir, sequences):
    teacher = InProcessTeacher.load(tiny_model_dir, deterministic=True)
    target = sequences[2]
    (alone,) = teacher.score([target], [1], OPTIONS)
    for batch in companies(sequences, target)[:4]:
        answers = teacher.score(batch, [1] * len(batch), OPTIONS)
        for sequence, answer in zip(batch, answers):
            if sequence == target:
                assert as_bytes(answer) == as_bytes(alone)


def test_serve_deterministic_loads_a_deterministic_backend(tiny_model_dir):
    config = ServerConfig(model=str(tiny_model_dir), device="cpu", deterministic=True)
    assert load_backend(config).deterministic
    assert not load_backend(ServerConfig(model=str(tiny_model_dir), device="cpu")).deterministic
