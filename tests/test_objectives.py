"""teacher_client.objectives: each built-in loss against the pure loss functions it stands
for, what it asks the teacher, and the registry's errors, each naming its key."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from teacher_client.losses import generalized_jsd, sparse_generalized_jsd
from teacher_client.objectives import (
    Objective,
    TeacherRows,
    loss_keys,
    loss_names,
    make_objective,
    register_loss,
)

N, V, K, T = 12, 40, 5, 1.7


@pytest.fixture(scope="module")
def signal() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TeacherRows]:
    """Random student logits [N, V], targets [N], teacher logits [N, V], and the teacher's
    rows at temperature T: its log-probs of the targets, its top-K, all V."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(N, V, generator=generator) * 3
    teacher = torch.randn(N, V, generator=generator) * 3
    targets = torch.randint(0, V, (N,), generator=generator)
    log_p = torch.log_softmax(teacher / T, dim=-1)
    top = log_p.topk(K, dim=-1)
    rows = TeacherRows(
        log_p.gather(-1, targets[:, None]).squeeze(-1), top.indices, top.values, log_p
    )
    return student, targets, teacher, rows


@pytest.mark.parametrize(
    ("name", "keys", "beta"),
    [
        ("forward_kl", {}, 0.0),
        ("reverse_kl", {}, 1.0),
        ("jsd", {}, 0.5),
        ("jsd", {"beta": 0.2}, 0.2),
    ],
)
@pytest.mark.parametrize("support", ["topk", "full"])
def test_each_generalized_jsd_is_the_pure_function_at_its_beta(signal, name, keys, beta, support):
    student, targets, teacher, rows = signal
    objective = make_objective(name, temperature=T, top_k=K, support=support, **keys)
    logits = student.clone().requires_grad_(True)
    loss, divergence = objective.token_losses(logits, targets, rows)
    if support == "full":  # the pure function scales both sides' logits itself
        expected = generalized_jsd(student, teacher, beta, temperature=T)
    else:
        expected = sparse_generalized_jsd(student, rows.support_ids, rows.support_logprobs, beta, T)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(divergence, expected)
    assert loss.requires_grad and not divergence.requires_grad


def test_sampled_rkl_reports_the_estimate_and_differentiates_the_policy_gradient(signal):
    student, targets, _, rows = signal
    objective = make_objective("sampled_rkl", temperature=T)
    logits = student.double().requires_grad_(True)
    loss, estimate = objective.token_losses(logits, targets, rows)
    log_q = torch.log_softmax(student.double() / T, dim=-1).gather(-1, targets[:, None])[:, 0]
    expected = log_q - rows.target_logprobs.double()  # computed in float32: to its rounding
    torch.testing.assert_close(estimate.double(), expected, atol=1e-6, rtol=1e-5)
    # d sum(loss) / d logits = estimate * d log q(y) / d logits, the score-function estimator
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    onehot = torch.nn.functional.one_hot(targets, V).double()
    expected = estimate.double()[:, None] * (onehot - torch.softmax(student.double() / T, -1)) / T
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "keys", "asked", "candidates"),
    [
        ("jsd", {}, (K, False), 3),
        ("reverse_kl", {"support": "full"}, (0, True), 0),
        ("sampled_rkl", {}, (0, False), 0),
    ],
)
def test_what_each_support_asks_the_teacher(name, keys, asked, candidates):
    objective = make_objective(name, temperature=T, top_k=K, student_candidates=3, **keys)
    options = objective.score_options("bfloat16")
    assert (options.top_k, options.full) == asked
    assert (options.temperature, options.dtype) == (T, "bfloat16")
    assert objective.candidates == candidates  # the union support is topk's alone


def test_the_built_ins_are_registered_with_their_own_keys():
    assert {"forward_kl", "reverse_kl", "jsd", "sampled_rkl"} <= set(loss_names())
    assert loss_keys("jsd") == ["support", "beta"]
    assert loss_keys("forward_kl") == ["support"] and loss_keys("sampled_rkl") == []
    assert make_objective("jsd", beta=1) == make_objective("jsd", beta=1.0)  # an int is a float


@pytest.mark.parametrize(
    ("name", "keys", "message"),
    [
        ("tvd", {}, r"^loss: 'tvd' is not a registered loss \(known: \[.*'jsd'"),
        ("jsd", {"bta": 0.5}, r"^bta: not a key of loss jsd \(its own: \['support', 'beta'\]"),
        ("forward_kl", {"beta": 0.5}, r"^beta: not a key of loss forward_kl"),
        ("jsd", {"beta": 1.5}, r"^beta: 1\.5 is outside \[0, 1\]$"),
        ("jsd", {"beta": float("nan")}, r"^beta: nan is outside"),
        ("jsd", {"beta": "high"}, r"^beta: expected float, got 'high'$"),
        ("jsd", {"beta": True}, r"^beta: expected float"),
        ("jsd", {"support": "sampled"}, r"^support: 'sampled' is not topk or full$"),
        ("reverse_kl", {"temperature": 0}, r"^temperature: 0\.0 must be > 0$"),
        ("reverse_kl", {"top_k": 0}, r"^top_k: 0 must be >= 1$"),
        ("sampled_rkl", {"student_candidates": -1}, r"^student_candidates: must be >= 0$"),
    ],
)
def test_bad_names_keys_and_values_are_refused_naming_them(name, keys, message):
    with pytest.raises(ValueError, match=message):
        make_objective(name, **keys)


def test_registration_takes_objectives_and_one_class_per_name():
    with pytest.raises(TypeError, match="not an Objective subclass"):
        register_loss("plain")(dict)

    @dataclass(frozen=True)
    class Other(Objective):
        pass

    with pytest.raises(ValueError, match=r"^loss: 'jsd' is registered already \(JSD\)"):
        register_loss("jsd")(Other)
    assert type(make_objective("jsd")).__name__ == "JSD"  # the built-in is still the one
