"""Training sequences: prompt masked, completion trained through its first eos, nothing after."""

from __future__ import annotations

import pytest
import torch

from causal_lm.sampling import SamplingOptions
from student_trainer.rollouts import build_batch, sample_completions, truncate_after_eos

EOS = 2


def expected_mask(prompt_len: int, completion_len: int, width: int) -> list[bool]:
    """Independent: target index i (token i + 1) is trained iff it lies in the completion."""
    return [prompt_len <= i + 1 < prompt_len + completion_len for i in range(width - 1)]


def test_prompt_masked_completion_trained_through_eos():
    prompts = [[1, 5, 6], [1, 7]]
    completions = [[8, 9, EOS], [10, EOS, 11, 12]]  # the second runs on past its eos
    batch = build_batch(prompts, completions, eos_ids={EOS}, pad_id=0)
    assert batch.sequences == [[1, 5, 6, 8, 9, EOS], [1, 7, 10, EOS]]
    assert batch.loss_mask.tolist() == [expected_mask(3, 3, 6), expected_mask(2, 2, 6)]
    trained = batch.input_ids[:, 1:][batch.loss_mask].tolist()
    assert trained == [8, 9, EOS, 10, EOS]  # both eos tokens trained, 11 and 12 never
    assert batch.num_tokens == 5


@pytest.mark.parametrize("pad_id", [0, EOS])
def test_eos_trained_when_pad_is_eos(pad_id):
    """With pad == eos the mask must come from lengths, not from comparing ids with pad."""
    prompts = [[1, 5], [1, 6, 7, 8]]
    completions = [[EOS, EOS, EOS], [9, 9, EOS]]  # a padded rollout: eos then pad (= eos)
    batch = build_batch(prompts, completions, eos_ids={EOS}, pad_id=pad_id)
    assert batch.input_ids[0].tolist() == [1, 5, EOS] + [pad_id] * 4
    assert batch.loss_mask.tolist() == [expected_mask(2, 1, 7), expected_mask(4, 3, 7)]
    assert batch.input_ids[:, 1:][batch.loss_mask].tolist() == [EOS, 9, 9, EOS]


def test_completion_without_eos_is_kept_whole():
    assert truncate_after_eos([4, 5, 6], {EOS}) == [4, 5, 6]
    assert truncate_after_eos([4, EOS, 6, EOS], {EOS, 6}) == [4, EOS]
    assert truncate_after_eos([6, EOS], {EOS, 6}) == [6]


def test_empty_completion_refused():
    with pytest.raises(ValueError, match="non-empty"):
        build_batch([[1, 2]], [[]], eos_ids={EOS}, pad_id=0)


def test_student_samples_stop_at_eos_and_mask_matches(backend):
    """Real KV-cache rollouts from a model whose pad id is its eos id."""
    prompts = [[1, 40, 41], [1, 42], [1, 43, 44, 45]]
    generator = torch.Generator().manual_seed(0)
    options = SamplingOptions(max_new_tokens=12, temperature=2.0)
    # make eos likely: eos = the tokens the model favours most after any of these prompts
    eos_ids = frozenset(range(3, backend.vocab_size, 3))
    completions = sample_completions(
        backend.model,
        prompts,
        options,
        vocab_size=backend.vocab_size,
        eos_ids=eos_ids,
        pad_id=min(eos_ids),
        generator=generator,
    )
    assert any(c[-1] in eos_ids and len(c) < 12 for c in completions)
    for completion in completions:
        assert all(t not in eos_ids for t in completion[:-1])
        assert len(completion) == 12 or completion[-1] in eos_ids
    batch = build_batch(prompts, completions, eos_ids=eos_ids, pad_id=min(eos_ids))
    assert batch.input_ids[:, 1:][batch.loss_mask].tolist() == [t for c in completions for t in c]
