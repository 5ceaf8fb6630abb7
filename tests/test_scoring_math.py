"""score_rows against the definitions, computed independently in float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
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


def _half_logits(dtype: torch.dtype, rows: int, vocab: int, padded: int) -> torch.Tensor:
    """A half-precision model's logits [rows, padded]: many tokens tie (8 or 11 significant
    bits), and the padded rows hold the largest logits, which must not leak in."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(rows, padded, generator=g) * 4).to(dtype)
    logits[:, vocab:] = 60.0
    return logits


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_scored_as_their_exact_float32_widening(dtype, temperature):
    rows, vocab, padded, k = 6, 300, 320, 16
    logits = _half_logits(dtype, rows, vocab, padded)
    rng = np.random.default_rng(2)
    targets = rng.integers(0, vocab, size=rows)
    candidates = rng.integers(0, vocab, size=(rows, 5))
    options = ScoreOptions(top_k=k, full=True, temperature=temperature, ranks=True)
    scores = score_rows(
        logits, torch.from_numpy(targets), vocab, options, torch.from_numpy(candidates)
    )
    widened = logits[:, :vocab].float().numpy().astype(np.float64)  # exact
    expected = _log_softmax(widened / temperature)
    np.testing.assert_allclose(scores.full_logprobs.numpy(), expected, atol=2e-6)
    at = np.arange(rows)
    np.testing.assert_allclose(scores.target_logprobs.numpy(), expected[at, targets], atol=2e-6)
    np.testing.assert_allclose(
        scores.candidate_logprobs.numpy(), np.take_along_axis(expected, candidates, 1), atol=2e-6
    )
    # the k largest log-probs, most likely first, each at the id returned for it (which of
    # several tied tokens fills the last places is the top-k kernel's choice)
    top = -np.sort(-expected, axis=1)[:, :k]
    ids = scores.topk_ids.numpy().astype(np.int64)
    np.testing.assert_allclose(scores.topk_logprobs.numpy(), top, atol=2e-6)
    np.testing.assert_allclose(np.take_along_axis(expected, ids, 1), top, atol=2e-6)
    assert all(len(set(row)) == k for row in ids.tolist()) and ids.max() < vocab
    # 1 + the tokens whose logit is strictly larger: the temperature changes nothing
    ahead = (widened > widened[at, targets][:, None]).sum(axis=1)
    assert scores.target_ranks.tolist() == (ahead + 1).tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize(
    "layout", ["float32", "float32 of wider rows", "float16", "bfloat16", "bfloat16 of wider rows"]
)
def test_every_returned_log_prob_is_read_from_one_distribution(layout, temperature):
    """Bit for bit: the targets', top-k's and candidates' log-probs are entries of full."""
    dtype = getattr(torch, layout.split()[0])
    rows, vocab = 9, 200
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(rows, vocab + 24 if "wider" in layout else vocab, generator=g) * 5
    logits = logits.to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    candidates = torch.randint(0, vocab, (rows, 7), generator=g)
    options = ScoreOptions(top_k=12, full=True, temperature=temperature)
    scores = score_rows(logits, targets, vocab, options, candidates)
    full = scores.full_logprobs
    assert full.dtype == torch.float32 and full.shape == (rows, vocab)
    assert torch.equal(scores.target_logprobs, full.gather(1, targets.unsqueeze(1)).squeeze(1))
    assert torch.equal(scores.topk_logprobs, full.gather(1, scores.topk_ids.long()))
    assert torch.equal(scores.candidate_logprobs, full.gather(1, candidates))
    assert (scores.topk_logprobs.diff(dim=1) <= 0).all()  # most likely first
    kth = scores.topk_logprobs[:, -1:]
    assert ((full > kth).sum(dim=1) < 12).all()  # nothing left out beats the last one kept
    # a distribution over the real vocabulary, whatever the layout and the temperature
    torch.testing.assert_close(
        full.double().exp().sum(dim=1), torch.ones(rows, dtype=torch.float64), atol=1e-5, rtol=0
    )
