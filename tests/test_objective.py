"""Teacher signal + student logits -> per-token losses, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from student_trainer.objective import (
    TeacherRows,
    completion_rows,
    divergence,
    group_advantages,
    reward_loss,
)
from student_trainer.rollouts import build_batch
from student_trainer.rows import StudentRows
from teacher_client import ScoreOptions
from teacher_client.objectives import make_objective
from teacher_service.in_process import InProcessTeacher
from tests.conftest import reference_logprobs

PROMPTS = [[1, 30, 31, 32], [1, 40], [1, 50, 51]]
COMPLETIONS = [[60, 61, 2], [70, 71, 72, 73, 2], [80]]


def as_rows(logits: torch.Tensor) -> StudentRows:
    """Rows that are logits already, all at once (tests/test_student_rows.py covers chunks)."""
    return StudentRows(logits, None, logits.shape[-1])


@pytest.fixture(scope="module")
def batch():
    return build_batch(PROMPTS, COMPLETIONS, eos_ids={2}, pad_id=0)


@pytest.fixture(scope="module")
def student_logits(batch, backend):
    torch.manual_seed(0)
    return torch.randn(*batch.input_ids.shape, backend.vocab_size, dtype=torch.float64) * 2


def test_teacher_rows_line_up_with_student_rows(batch, backend):
    """Row r of the teacher's signal is the same position as row r of completion_rows."""
    results = InProcessTeacher(backend).score(
        batch.sequences, batch.prompt_lens, ScoreOptions(top_k=0)
    )
    rows = TeacherRows.from_results(results)
    expected = []
    for seq, start in zip(batch.sequences, batch.prompt_lens):
        reference = reference_logprobs(backend, seq)  # row i predicts token i + 1
        expected += [reference[i - 1, seq[i]] for i in range(start, len(seq))]
    torch.testing.assert_close(rows.target_logprobs, torch.stack(expected), atol=1e-5, rtol=0)
    _, targets = completion_rows(torch.zeros(*batch.input_ids.shape, 4), batch)
    assert targets.tolist() == [t for c in COMPLETIONS for t in c]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_over_the_whole_vocabulary_equals_full(batch, backend, student_logits, beta):
    teacher = InProcessTeacher(backend)
    rows, targets = completion_rows(student_logits, batch)
    topk = make_objective("jsd", beta=beta, temperature=2.0)
    sparse = TeacherRows.from_results(
        teacher.score(
            batch.sequences,
            batch.prompt_lens,
            ScoreOptions(top_k=backend.vocab_size, temperature=2.0),
        )
    )
    full = TeacherRows.from_results(
        teacher.score(
            batch.sequences, batch.prompt_lens, ScoreOptions(top_k=0, full=True, temperature=2.0)
        )
    )
    got_sparse, _ = divergence(as_rows(rows), targets, sparse, topk)
    got_full, _ = divergence(
        as_rows(rows),
        targets,
        full,
        make_objective("jsd", beta=beta, temperature=2.0, support="full"),
    )
    # independent: the formula on explicit probabilities, teacher from a plain forward
    p = torch.cat(
        [
            reference_logprobs(backend, s, 2.0)[n - 1 : len(s) - 1].double()
            for s, n in zip(batch.sequences, batch.prompt_lens)
        ]
    ).exp()
    q = torch.softmax(rows.double() / 2.0, dim=-1)
    if beta == 0.0:  # the convention: beta 0 is forward KL, beta 1 reverse KL
        expected = (p * (p / q).log()).sum(-1)
    elif beta == 1.0:
        expected = (q * (q / p).log()).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        expected = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(got_full.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_sparse.double(), expected, atol=1e-5, rtol=1e-5)


def test_sampled_support_is_the_token_estimator(batch, backend, student_logits):
    teacher = InProcessTeacher(backend)
    rows, targets = completion_rows(student_logits.clone().requires_grad_(True), batch)
    signal = TeacherRows.from_results(
        teacher.score(batch.sequences, batch.prompt_lens, ScoreOptions(top_k=0))
    )
    loss, estimate = divergence(as_rows(rows), targets, signal, make_objective("sampled_rkl"))
    log_q = torch.log_softmax(rows.detach().float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(estimate, log_q - signal.target_logprobs)
    # gradient of sum(loss): (log q - log p) * d log q(y), the score-function estimator
    (grad,) = torch.autograd.grad(loss.sum(), rows)
    onehot = torch.nn.functional.one_hot(targets, rows.shape[-1]).double()
    expected = (log_q - signal.target_logprobs).double()[:, None] * (
        onehot - torch.softmax(rows.detach(), -1)
    )
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_group_advantages_subtract_the_group_mean():
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    expected = np.array(rewards).reshape(-1, 3)
    expected = (expected - expected.mean(axis=1, keepdims=True)).ravel()
    np.testing.assert_allclose(group_advantages(rewards, 3).numpy(), expected, atol=1e-7)


def test_reward_loss_gradient_is_reinforce(batch, student_logits):
    rows, targets = completion_rows(student_logits.clone().requires_grad_(True), batch)
    advantages = torch.tensor([0.5, -1.0, 2.0])
    loss = reward_loss(as_rows(rows), targets, batch, advantages)
    (grad,) = torch.autograd.grad(loss.sum(), rows)
    per_token = torch.tensor([0.5] * 3 + [-1.0] * 5 + [2.0], dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(targets, rows.shape[-1]).double()
    expected = -per_token[:, None] * (onehot - torch.softmax(rows.detach(), -1))
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)
