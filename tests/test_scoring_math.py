"""score_rows against the definitions, computed independently in float64 numpy."""

from __future__ import annotations

import numpy as np
import torch

from teacher_service.scoring import ScoreOptions, score_rows


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_rows_follow_the_definitions():
    rng = np.random.default_rng(0)
    rows, vocab, padded = 7, 50, 64
    logits = rng.normal(scale=3.0, size=(rows, padded)).astype(np.float32)
    logits[:, vocab:] = 100.0  # padded rows with huge logits must not leak in
    targets = rng.integers(0, vocab, size=rows)
    candidates = rng.integers(0, vocab, size=(rows, 4))
    options = ScoreOptions(top_k=5, full=True, temperature=0.7)
    scores = score_rows(
        torch.from_numpy(logits),
        torch.from_numpy(targets),
        vocab,
        options,
        torch.from_numpy(candidates),
    )
    expected = _log_softmax(logits[:, :vocab].astype(np.float64) / 0.7)
    np.testing.assert_allclose(scores.full_logprobs.numpy(), expected, atol=2e-6)
    np.testing.assert_allclose(
        scores.target_logprobs.numpy(), expected[np.arange(rows), targets], atol=2e-6
    )
    np.testing.assert_allclose(
        scores.candidate_logprobs.numpy(), np.take_along_axis(expected, candidates, 1), atol=2e-6
    )
    order = np.argsort(-expected, axis=1)[:, :5]
    np.testing.assert_array_equal(scores.topk_ids.numpy(), order)
    np.testing.assert_allclose(
        scores.topk_logprobs.numpy(), np.take_along_axis(expected, order, 1), atol=2e-6
    )


def test_output_dtype_is_a_cast_of_the_float32_result():
    logits = torch.randn(4, 30, dtype=torch.bfloat16)  # a bfloat16 model's logits
    targets = torch.tensor([1, 2, 3, 4])
    exact = score_rows(logits, targets, 30, ScoreOptions(top_k=3, full=True))
    for dtype in (torch.float16, torch.bfloat16):
        cast = score_rows(logits, targets, 30, ScoreOptions(top_k=3, full=True, dtype=dtype))
        assert cast.full_logprobs.dtype == dtype and cast.topk_ids.dtype == torch.int32
        torch.testing.assert_close(
            cast.full_logprobs, exact.full_logprobs.to(dtype), rtol=0, atol=0
        )
        torch.testing.assert_close(
            cast.target_logprobs, exact.target_logprobs.to(dtype), rtol=0, atol=0
        )


def test_no_topk_no_candidates_no_full_returns_targets_only():
    scores = score_rows(torch.randn(3, 10), torch.tensor([0, 1, 2]), 10, ScoreOptions())
    assert scores.target_logprobs.shape == (3,)
    assert (
        scores.topk_ids is None
        and scores.candidate_logprobs is None
        and scores.full_logprobs is None
    )
