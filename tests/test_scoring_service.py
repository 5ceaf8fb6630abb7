"""Scores through the gRPC service against an in-process forward of the same model."""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from teacher_client import AsyncTeacherClient
from tests.conftest import reference_logprobs

ATOL = 1e-5


def _expected_rows(backend, ids: list[int], score_from: int, temperature: float = 1.0):
    """Rows for positions score_from .. len-1 and the targets there, from the reference."""
    logprobs = reference_logprobs(backend, ids, temperature)[score_from - 1 : len(ids) - 1]
    return logprobs.numpy(), np.asarray(ids[score_from:])


def _mixed_batch(sequences: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    starts = [1 + (n * 3) % (len(s) - 1) for n, s in enumerate(sequences)]
    return sequences, starts


def test_target_topk_full_match_in_process_forward(client, backend, sequences):
    seqs, starts = _mixed_batch(sequences)
    assert len(set(map(len, seqs))) > 3 and len(set(starts)) > 2
    results = client.score(seqs, starts, top_k=16, full=True)
    assert len(results) == len(seqs)
    for ids, start, result in zip(seqs, starts, results):
        expected, targets = _expected_rows(backend, ids, start)
        rows = len(ids) - start
        assert result.target_logprobs.shape == (rows,)
        assert result.full_logprobs.shape == (rows, backend.vocab_size)
        np.testing.assert_allclose(result.full_logprobs, expected, atol=ATOL, rtol=0)
        np.testing.assert_allclose(
            result.target_logprobs, expected[np.arange(rows), targets], atol=ATOL, rtol=0
        )
        expected_top = -np.sort(-expected, axis=1)[:, :16]
        np.testing.assert_allclose(result.topk_logprobs, expected_top, atol=ATOL, rtol=0)
        # the ids point at those values in the reference distribution
        np.testing.assert_allclose(
            np.take_along_axis(expected, result.topk_ids.astype(np.int64), axis=1),
            result.topk_logprobs,
            atol=ATOL,
            rtol=0,
        )
        assert result.topk_ids.dtype == np.int32 and result.candidate_logprobs is None


def test_padded_embedding_rows_are_never_returned(client, backend, sequences):
    logits_rows = backend.model.get_output_embeddings().weight.shape[0]
    assert logits_rows > backend.vocab_size  # the tiny model pads its embedding, as real ones do
    (result,) = client.score(sequences[:1], 1, top_k=backend.vocab_size, full=True)
    assert result.full_logprobs.shape[1] == backend.vocab_size
    assert result.topk_ids.max() < backend.vocab_size
    # a distribution over the real vocabulary: it sums to one there
    np.testing.assert_allclose(np.exp(result.full_logprobs.astype(np.float64)).sum(1), 1, atol=1e-5)


def test_temperature_divides_logits_before_log_softmax(client, backend, sequences):
    ids = sequences[1]
    for temperature in (0.5, 2.0):
        (result,) = client.score([ids], 2, top_k=4, full=True, temperature=temperature)
        expected, targets = _expected_rows(backend, ids, 2, temperature)
        np.testing.assert_allclose(result.full_logprobs, expected, atol=ATOL, rtol=0)
        np.testing.assert_allclose(
            result.target_logprobs, expected[np.arange(len(targets)), targets], atol=ATOL, rtol=0
        )


def test_batch_invariance_alone_vs_mixed_batch_of_16(client, sequences):
    rng = random.Random(0)
    batch = [rng.choice(sequences)[: rng.randint(3, 20)] for _ in range(15)]
    probe = sequences[3]
    (alone,) = client.score([probe], 2, top_k=8, full=True)
    mixed = client.score([*batch[:7], probe, *batch[7:]], 2, top_k=8, full=True)
    for name in ("target_logprobs", "topk_logprobs", "full_logprobs"):
        np.testing.assert_allclose(getattr(mixed[7], name), getattr(alone, name), atol=ATOL, rtol=0)
    np.testing.assert_array_equal(mixed[7].topk_ids, alone.topk_ids)


def test_topk_candidates_and_full_agree(client, backend, sequences):
    ids, start = sequences[3], 3
    rows = len(ids) - start
    rng = np.random.default_rng(0)
    per_row = rng.integers(0, backend.vocab_size, size=(rows, 5))
    shared = np.array([0, 7, backend.vocab_size - 1])
    per_row_result, shared_result = client.score(
        [ids, ids], start, top_k=10, full=True, candidates=[per_row, shared]
    )
    full = per_row_result.full_logprobs
    np.testing.assert_array_equal(
        per_row_result.candidate_logprobs, np.take_along_axis(full, per_row, axis=1)
    )
    np.testing.assert_array_equal(shared_result.candidate_logprobs, full[:, shared])
    np.testing.assert_array_equal(
        per_row_result.topk_logprobs,
        np.take_along_axis(full, per_row_result.topk_ids.astype(int), 1),
    )
    assert (np.diff(per_row_result.topk_logprobs, axis=1) <= 0).all()  # most likely first
    kth = per_row_result.topk_logprobs[:, -1:]
    assert ((full > kth).sum(axis=1) < 10).all()  # nothing outside the top-k beats its last


def test_candidates_shared_by_all_sequences(client, sequences):
    shared = [5, 6, 7]
    results = client.score(sequences[:3], 1, top_k=0, full=True, candidates=shared)
    for result in results:
        assert result.topk_ids is None
        np.testing.assert_array_equal(result.candidate_logprobs, result.full_logprobs[:, shared])


@pytest.mark.parametrize("dtype, significant_bits", [("float16", 11), ("bfloat16", 8)])
def test_half_precision_outputs_agree_with_float32(client, sequences, dtype, significant_bits):
    seqs, starts = _mixed_batch(sequences)
    exact = client.score(seqs, starts, top_k=8, full=True)
    half = client.score(seqs, starts, top_k=8, full=True, dtype=dtype)
    for e, h in zip(exact, half):
        assert h.full_logprobs.dtype == (np.float16 if dtype == "float16" else np.float32)
        # round to nearest: relative error at most half a unit in the last place
        rtol = 2.0**-significant_bits
        for name in ("target_logprobs", "topk_logprobs", "full_logprobs"):
            np.testing.assert_allclose(
                getattr(h, name).astype(np.float64), getattr(e, name), rtol=rtol, atol=0
            )


def test_sixteen_concurrent_client_threads_get_their_own_results(client, backend, sequences):
    rng = random.Random(1)
    jobs = [(rng.choice(sequences)[: rng.randint(4, 30)], rng.randint(1, 3)) for _ in range(48)]

    def run(job):
        ids, start = job
        (result,) = client.score([ids], start, top_k=4)
        return result

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, jobs))
    for (ids, start), result in zip(jobs, results):
        expected, targets = _expected_rows(backend, ids, start)
        np.testing.assert_allclose(
            result.target_logprobs, expected[np.arange(len(targets)), targets], atol=ATOL, rtol=0
        )


def test_async_client_concurrent_calls(server, client, sequences):
    async def main():
        async with AsyncTeacherClient(server.address) as teacher:
            info = await teacher.info()
            results = await asyncio.gather(*(teacher.score([s], 1, top_k=3) for s in sequences))
            completions = await teacher.generate(sequences[:2], max_new_tokens=4, seed=3)
            return info, [r[0] for r in results], completions

    info, results, completions = asyncio.run(main())
    assert info == client.info()
    expected = client.score(sequences, 1, top_k=3)
    for a, b in zip(results, expected):
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=ATOL, rtol=0)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    assert completions == client.generate(sequences[:2], max_new_tokens=4, seed=3)


def test_score_stream_pipelines_and_keeps_order(client, sequences):
    calls = [dict(sequences=[s], score_from=1, top_k=4) for s in sequences * 3]
    streamed = list(client.score_stream(calls, window=4))
    assert len(streamed) == len(calls)
    for call, (result,) in zip(calls, streamed):
        (expected,) = client.score(**call)
        np.testing.assert_allclose(result.target_logprobs, expected.target_logprobs, atol=ATOL)
        np.testing.assert_array_equal(result.topk_ids, expected.topk_ids)
