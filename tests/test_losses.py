"""student_trainer.losses against independent computations (plain math, float64 by formula)."""

from __future__ import annotations

import math

import pytest
import torch

from student_trainer.losses import (
    generalized_jsd,
    policy_gradient_loss,
    sampled_reverse_kl,
    sparse_generalized_jsd,
    token_level_loss,
)

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


# ---- independent references -----------------------------------------------------------------


def _jsd_py(p: list[float], q: list[float], beta: float) -> float:
    """The definition on explicit probabilities, with plain Python floats."""

    def kl(a: list[float], b: list[float]) -> float:
        return sum(x * math.log(x / y) if y > 0 else math.inf for x, y in zip(a, b) if x > 0)

    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def _softmax_py(logits: list[float]) -> list[float]:
    z = [math.exp(x - max(logits)) for x in logits]
    return [x / sum(z) for x in z]


def _jsd_ref(student: torch.Tensor, teacher: torch.Tensor, beta: float, t: float = 1.0):
    """float64 by direct formula on probabilities (no log-space tricks)."""
    q = torch.softmax(student.double() / t, -1)
    p = torch.softmax(teacher.double() / t, -1)
    if beta == 0:
        return (p * (p / q).log()).sum(-1)
    if beta == 1:
        return (q * (q / p).log()).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)


# ---- generalized_jsd ------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.25, 1.0])
def test_hand_derived_tiny_vocab(beta: float) -> None:
    for s_logits, t_logits in [([0.0, 1.0], [2.0, -1.0]), ([0.3, -1.2, 2.0], [1.0, 1.0, -0.5])]:
        expected = _jsd_py(_softmax_py(t_logits), _softmax_py(s_logits), beta)
        got = generalized_jsd(torch.tensor(s_logits), torch.tensor(t_logits), beta)
        assert got.shape == ()
        assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_hand_derived_explicit_probabilities() -> None:
    # p = (1/2, 1/2), q = (1/4, 3/4): every value written out by hand. float64, so the
    # check is of the formula, not of a float32 rounding that varies with CPU and torch
    # (in float32 the JSD's relative error reached 1.1e-6 with torch 2.11 on an H200 host)
    p, q = [0.5, 0.5], [0.25, 0.75]
    s, t = torch.tensor(q, dtype=torch.float64).log(), torch.tensor(p, dtype=torch.float64).log()
    fwd = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    rev = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    m = [0.375, 0.625]  # beta = 0.5
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )
    assert generalized_jsd(s, t, 0.0).item() == pytest.approx(fwd, rel=1e-12)
    assert generalized_jsd(s, t, 1.0).item() == pytest.approx(rev, rel=1e-12)
    assert generalized_jsd(s, t, 0.5).item() == pytest.approx(jsd, rel=1e-12)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_matches_float64_reference(beta: float, temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 5, 17, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2, 3, 5, 17, generator=g, dtype=torch.float64) * 3
    got = generalized_jsd(student, teacher, beta, temperature)
    assert got.shape == (2, 3, 5) and got.dtype == torch.float64
    torch.testing.assert_close(got, _jsd_ref(student, teacher, beta, temperature))
    assert (got >= 0).all()


def test_small_beta_limits_are_the_kls() -> None:
    g = torch.Generator().manual_seed(1)
    student = torch.randn(4, 11, generator=g, dtype=torch.float64)
    teacher = torch.randn(4, 11, generator=g, dtype=torch.float64)
    fwd, rev = _jsd_ref(student, teacher, 0.0), _jsd_ref(student, teacher, 1.0)
    eps = 1e-4
    # JSD(beta) = beta KL(p||q) + O(beta^2); symmetrically near beta = 1.
    torch.testing.assert_close(generalized_jsd(student, teacher, eps) / eps, fwd, rtol=1e-3, atol=0)
    near_one = generalized_jsd(student, teacher, 1 - eps) / eps
    torch.testing.assert_close(near_one, rev, rtol=1e-3, atol=0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gradcheck(beta: float) -> None:
    g = torch.Generator().manual_seed(2)
    student = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s, t: generalized_jsd(s, t, beta, 0.8), (student, teacher)
    )


def test_forward_kl_gradient_is_q_minus_p() -> None:
    g = torch.Generator().manual_seed(3)
    student = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 9, generator=g, dtype=torch.float64)
    generalized_jsd(student, teacher, 0.0).sum().backward()
    expected = torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)
    torch.testing.assert_close(student.grad, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("beta", BETAS)
def test_low_precision_inputs(dtype: torch.dtype, beta: float) -> None:
    g = torch.Generator().manual_seed(4)
    student = (torch.randn(3, 4, 50, generator=g) * 2).to(dtype)
    teacher = (torch.randn(3, 4, 50, generator=g) * 2).to(dtype)
    got = generalized_jsd(student, teacher, beta)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # Same rounded inputs, float64 math: only float32 arithmetic error remains.
    torch.testing.assert_close(got.double(), _jsd_ref(student, teacher, beta), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_zero_probabilities_give_finite_values_and_gradients(beta: float) -> None:
    inf = math.inf
    # Huge gaps: probabilities underflow to exactly 0 while the logits stay finite.
    student = torch.tensor([[0.0, 1.0, -1e4, 3e4], [-inf, 0.0, 1.0, -inf]], requires_grad=True)
    teacher = torch.tensor([[0.5, -2.0, 2e4, 3e4], [-inf, 0.5, 0.0, -inf]], requires_grad=True)
    if 0 < beta < 1:  # the mixture covers both supports: -inf may differ between the two
        with torch.no_grad():
            student[0, 0], teacher[1, 1] = -inf, -inf
    got = generalized_jsd(student, teacher, beta)
    got.sum().backward()
    assert torch.isfinite(got).all()
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()
    torch.testing.assert_close(
        got.double(), _safe_ref(student, teacher, beta), rtol=1e-5, atol=1e-6
    )


def _safe_ref(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """_jsd_ref in plain Python, skipping p = 0 terms (0 log 0 = 0)."""
    rows = []
    for s_row, t_row in zip(student.detach().double().tolist(), teacher.detach().double().tolist()):
        q, p = (_softmax_py(r) for r in (s_row, t_row))
        rows.append(_jsd_py(p, q, beta))
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("kwargs", [{"beta": -0.1}, {"beta": 1.5}, {"beta": math.nan}])
def test_bad_beta(kwargs: dict) -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(x, x, **kwargs)
    with pytest.raises(ValueError, match="beta"):
        sparse_generalized_jsd(x, torch.tensor([0]), torch.tensor([-1.0]), **kwargs)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan])
def test_bad_temperature(temperature: float) -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd(x, x, 0.5, temperature)
    with pytest.raises(ValueError, match="temperature"):
        sparse_generalized_jsd(x, torch.tensor([0]), torch.tensor([-1.0]), 0.5, temperature)


# ---- sparse_generalized_jsd -----------------------------------------------------------------


def _teacher_at(teacher_logits: torch.Tensor, ids: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(teacher_logits.double() / t, -1).gather(-1, ids)


@pytest.mark.parametrize("beta", BETAS)
def test_sparse_equals_full_on_the_whole_vocabulary(beta: float) -> None:
    g = torch.Generator().manual_seed(5)
    shape, vocab, t = (2, 3), 13, 0.9
    student = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2
    ids = torch.stack([torch.randperm(vocab, generator=g) for _ in range(6)]).view(*shape, vocab)
    full = _jsd_ref(student, teacher, beta, t)
    sparse = sparse_generalized_jsd(student, ids, _teacher_at(teacher, ids, t), beta, t)
    torch.testing.assert_close(sparse, full)
    # Top-k concatenated with overlapping candidates: the duplicates count once.
    cands = torch.cat([ids[..., :4], ids[..., 2:9]], dim=-1)
    dup_ids = torch.cat([ids, cands], dim=-1)
    sparse = sparse_generalized_jsd(student, dup_ids, _teacher_at(teacher, dup_ids, t), beta, t)
    torch.testing.assert_close(sparse, full)
    # float32 teacher log-probs (sum slightly off 1) and float32 logits: still the full value.
    got = sparse_generalized_jsd(
        student.float(), ids, _teacher_at(teacher, ids, t).float(), beta, t
    )
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("beta", BETAS)
def test_sparse_partial_support_is_the_bucketed_divergence(beta: float) -> None:
    g = torch.Generator().manual_seed(6)
    vocab = 10
    student = torch.randn(4, vocab, generator=g, dtype=torch.float64)
    teacher = torch.randn(4, vocab, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:4] for _ in range(4)])
    ids = torch.cat([ids, ids[:, :2]], dim=-1)  # repeated candidates
    got = sparse_generalized_jsd(student, ids, _teacher_at(teacher, ids), beta)
    for row in range(4):
        q, p = torch.softmax(student[row], -1).tolist(), torch.softmax(teacher[row], -1).tolist()
        support = sorted(set(ids[row].tolist()))
        ps = [p[i] for i in support] + [1 - sum(p[i] for i in support)]
        qs = [q[i] for i in support] + [sum(q[i] for i in range(vocab) if i not in support)]
        assert got[row].item() == pytest.approx(_jsd_py(ps, qs, beta), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("beta", BETAS)
def test_top1_support_is_nontrivial_through_the_tail(beta: float) -> None:
    g = torch.Generator().manual_seed(7)
    student = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 8, generator=g, dtype=torch.float64)
    top = teacher.argmax(-1, keepdim=True)
    got = sparse_generalized_jsd(student, top, _teacher_at(teacher, top), beta)
    for row in range(3):
        p_top = torch.softmax(teacher[row], -1)[top[row, 0]].item()
        q_top = torch.softmax(student[row].detach(), -1)[top[row, 0]].item()
        expected = _jsd_py([p_top, 1 - p_top], [q_top, 1 - q_top], beta)
        assert got[row].item() == pytest.approx(expected, rel=1e-9)
    assert (got > 0).all()
    got.sum().backward()
    assert torch.isfinite(student.grad).all() and (student.grad.abs().sum(-1) > 0).all()


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_sparse_gradcheck(beta: float) -> None:
    g = torch.Generator().manual_seed(8)
    student = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    ids = torch.tensor([[[0, 3, 3], [6, 1, 2], [4, 4, 5]], [[2, 0, 1], [5, 6, 0], [1, 1, 1]]])
    logprobs = _teacher_at(teacher, ids, 1.3)
    fn = lambda s: sparse_generalized_jsd(s, ids, logprobs, beta, 1.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (student,))


@pytest.mark.parametrize("beta", BETAS)
def test_sparse_half_precision_teacher_over_one(beta: float) -> None:
    g = torch.Generator().manual_seed(9)
    ids = torch.tensor([[4, 0, 2]])
    for dtype in (torch.float16, torch.bfloat16):
        logprobs = torch.tensor([[0.6, 0.3, 0.101]]).log().to(dtype)
        assert logprobs.double().exp().sum() > 1  # the premise: rounded mass over 1
        student = torch.randn(1, 6, generator=g, requires_grad=True)
        got = sparse_generalized_jsd(student, ids, logprobs, beta)
        got.sum().backward()
        assert torch.isfinite(got).all() and (got >= 0).all()
        assert torch.isfinite(student.grad).all()
        # The teacher tail is floored at the dtype's precision, the support scaled to the rest.
        tail = torch.finfo(dtype).eps
        p = [math.exp(x) for x in logprobs.double().squeeze(0).tolist()]
        p = [x / sum(p) * (1 - tail) for x in p]
        q = torch.softmax(student.detach().double(), -1).squeeze(0).tolist()
        expected = _jsd_py([*p, tail], [q[4], q[0], q[2], q[1] + q[3] + q[5]], beta)
        assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_sparse_zero_probabilities(beta: float) -> None:
    inf = math.inf
    # The student gives the complement exactly zero mass (tail 0): the teacher's rounded
    # float32 mass (not exactly 1) must not make the forward KL infinite.
    student = torch.tensor([[0.0, 1.0, 2.0, -inf, -inf]], requires_grad=True)
    teacher = torch.tensor([[1.0, 2.0, 0.5, -inf, -inf]])
    ids = torch.tensor([[2, 0, 1, 0]])
    got = sparse_generalized_jsd(student, ids, _teacher_at(teacher, ids).float(), beta)
    got.sum().backward()
    assert torch.isfinite(student.grad).all()
    p, q = (_softmax_py(x[0, :3].tolist()) for x in (teacher, student.detach()))
    assert got.item() == pytest.approx(_jsd_py(p, q, beta), rel=1e-5)

    # Huge gaps: in-support and tail probabilities underflow to 0 with finite logits. The
    # student's mass is all in the tail, where the teacher's tail is floored at float32 eps.
    student = torch.tensor([[-2e4, 0.0, 1.0, -1e5, 3e4]], requires_grad=True)
    got = sparse_generalized_jsd(student, ids, _teacher_at(teacher, ids).float(), beta)
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(student.grad).all()
    if beta == 1:  # KL(q||p) = 1 * log(1 / eps)
        assert got.item() == pytest.approx(-math.log(torch.finfo(torch.float32).eps), rel=1e-5)


# ---- sampled estimator, policy gradient -----------------------------------------------------


def test_sampled_reverse_kl_is_unbiased() -> None:
    g = torch.Generator().manual_seed(9)
    log_q = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    log_p = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    exact = sum(math.exp(a) * (a - b) for a, b in zip(log_q.tolist(), log_p.tolist()))
    y = torch.multinomial(log_q.exp(), 200_000, replacement=True, generator=g)
    estimate = sampled_reverse_kl(log_q[y], log_p[y])
    assert estimate.shape == y.shape
    stderr = estimate.std().item() / math.sqrt(y.numel())
    assert abs(estimate.mean().item() - exact) < 5 * stderr


def test_policy_gradient_loss_gradient() -> None:
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (4,), generator=g)
    token_logprobs = torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)
    adv = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    loss = policy_gradient_loss(token_logprobs, adv)
    torch.testing.assert_close(loss, -(adv.detach() * token_logprobs.detach()))
    loss.sum().backward()
    # d log softmax(l)_y / d l = onehot(y) - softmax(l)
    dlogq = torch.nn.functional.one_hot(y, 7).double() - torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(logits.grad, -adv.detach()[:, None] * dlogq)
    assert adv.grad is None


# ---- token_level_loss -----------------------------------------------------------------------


def test_token_level_loss_accumulates_to_one_big_batch() -> None:
    g = torch.Generator().manual_seed(11)
    values = torch.randn(5, 6, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 2, 5, 3])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    total = int(mask.sum())
    big_mean = values[mask].mean()
    micro = [slice(0, 2), slice(2, 5)]  # 7 and 10 tokens: unequal
    summed = sum(token_level_loss(values[s], mask[s], total) for s in micro)
    torch.testing.assert_close(summed, big_mean)
    torch.testing.assert_close(
        token_level_loss(values, mask.double(), torch.tensor(total)), big_mean
    )
    per_micro = sum(values[s][mask[s]].mean() for s in micro) / len(micro)
    assert abs(per_micro - big_mean) > 1e-3


def test_token_level_loss_masked_nan_does_not_leak() -> None:
    values = torch.tensor([[1.0, 2.0, math.nan], [3.0, math.inf, -math.inf]], requires_grad=True)
    for mask in (
        torch.tensor([[1, 1, 0], [1, 0, 0]]).bool(),
        torch.tensor([[1.0, 1, 0], [1, 0, 0]]),
    ):
        values.grad = None
        loss = token_level_loss(values, mask, 3)
        assert loss.item() == pytest.approx(2.0)
        loss.backward()
        assert torch.equal(values.grad, mask.float() / 3)


@pytest.mark.parametrize("num_tokens", [0, -2, torch.tensor(0)])
def test_token_level_loss_rejects_empty(num_tokens: int | torch.Tensor) -> None:
    with pytest.raises(ValueError, match="num_tokens"):
        token_level_loss(torch.ones(2), torch.ones(2), num_tokens)
