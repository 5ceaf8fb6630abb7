"""The Hugging Face backend in each weight dtype, against the float32 in-process forward."""

from __future__ import annotations

import math

import pytest
import torch

from teacher_service.backend import HFBackend, ScoreItem
from teacher_service.backend_api import Backend, Capability
from teacher_service.scoring import ScoreOptions
from tests.conftest import reference_logprobs


def test_the_hf_backend_provides_the_whole_backend_contract(backend):
    assert isinstance(backend, Backend)
    assert backend.capabilities == tuple(Capability)  # a local model computes everything
    assert backend.samples_while_scoring


def _ulp_at(value: float, dtype: torch.dtype) -> float:
    """The spacing of `dtype` numbers around `value`."""
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(abs(value)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_score_close_to_float32(tiny_model_dir, backend, sequences, dtype):
    half = HFBackend.load(tiny_model_dir, device="cpu", dtype=dtype)
    assert half.model_dtype == dtype and half.vocab_size == backend.vocab_size
    items = [ScoreItem(torch.tensor(ids), 1, ScoreOptions(full=True)) for ids in sequences]
    for ids, scores in zip(sequences, half.score_batch(items).scores):
        assert (
            scores.full_logprobs.dtype == torch.float32
        )  # computed in float32 whatever the weights
        with torch.inference_mode():
            logits = half.model(torch.tensor([ids])).logits[0, :-1, : half.vocab_size]
        ulp = _ulp_at(logits.float().abs().max().item(), getattr(torch, dtype))
        # batched vs alone: half-precision kernels round differently for other shapes, by a
        # few units in the last place of the logits (in float32 the same test holds to 1e-5)
        alone = torch.log_softmax(logits.float(), dim=-1)
        torch.testing.assert_close(scores.full_logprobs, alone, atol=4 * ulp, rtol=0)
        # and the half-precision model is the float32 model, rounded
        expected = reference_logprobs(backend, ids)[:-1]
        torch.testing.assert_close(scores.full_logprobs, expected, atol=8 * ulp, rtol=0)


def test_batched_forward_equals_each_sequence_alone(backend, sequences):
    options = ScoreOptions(top_k=5, full=True)
    items = [ScoreItem(torch.tensor(ids), 1 + n % 3, options) for n, ids in enumerate(sequences)]
    batched = backend.score_batch(items).scores
    for item, together in zip(items, backend.score_batch(items[::-1]).scores[::-1]):
        (alone,) = backend.score_batch([item]).scores
        torch.testing.assert_close(together.full_logprobs, alone.full_logprobs, atol=1e-5, rtol=0)
    for item, scores in zip(items, batched):
        expected = reference_logprobs(backend, item.token_ids.tolist())[item.score_from - 1 : -1]
        torch.testing.assert_close(scores.full_logprobs, expected, atol=1e-5, rtol=0)
