"""The divergences a torch trainer computes from the service's answer (needs torch).

The service returns the teacher's log-probs on a sparse support (its top-k ids, optionally
plus candidates), not the whole vocabulary. `sparse_generalized_jsd` is the exact
generalized JSD between the student's and the teacher's distributions restricted to that
support plus one tail bucket holding the rest of the mass (docs/design.md, "Objectives"), so
that any beta, forward KL to reverse KL, trains on a top-k answer, and a top-1 support still
carries signal through the tail.

Beside it: the generalized JSD on the full vocabulary (`generalized_jsd`, for a full
answer), and the sampled-token reverse-KL estimator with its policy-gradient surrogate
(`sampled_reverse_kl`, `policy_gradient_loss`, for the teacher's log-prob of the sampled
token alone). Every divergence is per position (the last, vocabulary or bucket, axis is
reduced), p = teacher, q = student.

They live in the client distribution, not the trainer, so that the built-in objectives
(`teacher_client.objectives`) and a trainer in another framework (TRL:
`teacher_client.trl`) train on exactly the functions ours does: `student_trainer.losses`
imports them from here. torch is not a dependency of the client; the `trl` extra brings it
(through TRL), and nothing in `teacher_client/__init__.py` imports this module.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NEG_INF = -math.inf


def check_arguments(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0:  # also rejects NaN
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    # bfloat16/float16 logits lose too much in log_softmax and the sums; float64 stays float64.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _logsumexp(x: Tensor, dim: int) -> Tensor:
    """logsumexp that is -inf (with zero, not NaN, gradient) over an all -inf slice."""
    alive = (x > NEG_INF).any(dim, keepdim=True)
    out = torch.logsumexp(torch.where(alive, x, 0.0), dim)
    return torch.where(alive.squeeze(dim), out, NEG_INF)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012); -inf once x >= 0."""
    alive = x < 0
    x = torch.where(alive, x, -1.0)
    out = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return torch.where(alive, out, NEG_INF)


def _kl(log_x: Tensor, log_y: Tensor) -> Tensor:
    """sum x log(x / y) over the last axis, where a bucket with x == 0 contributes 0."""
    alive = log_x > NEG_INF
    log_x, log_y = torch.where(alive, log_x, 0.0), torch.where(alive, log_y, 0.0)
    terms = torch.where(alive, log_x.exp() * (log_x - log_y), 0.0)
    return terms.sum(-1)


def generalized_divergence(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """Generalized JSD between two normalised log-distributions (beta 0: KL(p||q), 1: KL(q||p))."""
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    # log m = log(beta p + (1 - beta) q), without ever leaving log space.
    mix = torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)])
    log_m = _logsumexp(mix, 0)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def sparse_generalized_jsd(
    student_logits: Tensor,
    support_ids: Tensor,
    teacher_logprobs: Tensor,
    beta: float,
    temperature: float = 1.0,
) -> Tensor:
    """Generalized JSD(beta) on the teacher's sparse support plus one tail bucket: [...].

    `student_logits` [..., V], `support_ids` [..., k] (ids may repeat; each counts once) and
    `teacher_logprobs` [..., k], the teacher's log-probs of those ids at the distillation
    temperature (what `TeacherClient.score(..., temperature=t)` returns); only the student
    logits are divided by `temperature`. beta = 0 is forward KL(p||q), beta = 1 reverse
    KL(q||p), in between beta KL(p||m) + (1 - beta) KL(q||m), m = beta p + (1 - beta) q (the
    GKD paper's and TRL's convention). Exact when the support is the whole vocabulary.
    Computed in float32 (float64 when given float64) whatever the input dtype; buckets of
    zero probability contribute exactly 0 and never a NaN gradient.
    """
    check_arguments(beta, temperature)
    dtype = compute_dtype(student_logits, teacher_logprobs)
    log_q_full = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)

    # Count each id once: sort, and turn an entry equal to its predecessor into an empty bucket.
    ids, order = torch.sort(support_ids, dim=-1, stable=True)
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[..., 1:] = ids[..., 1:] == ids[..., :-1]
    log_q = torch.where(dup, NEG_INF, log_q_full.gather(-1, ids))
    log_p = torch.where(dup, NEG_INF, teacher_logprobs.to(dtype).gather(-1, order))

    # Student tail: exact logsumexp over the complement (no 1 - sum cancellation).
    in_support = torch.zeros_like(log_q_full, dtype=torch.bool).scatter(-1, ids, True)
    log_q_tail = _logsumexp(torch.where(in_support, NEG_INF, log_q_full), -1)

    # Teacher tail: log(1 - mass), known only to the precision of the log-probs (float16 or
    # bfloat16 rounding can even push the mass over 1). A tail rounded to 0 against a student
    # tail > 0 would make KL(q||p) infinite, so floor it at that precision (eps of the dtype)
    # and scale the support to 1 - tail. When the student has no tail (the support covers
    # every token it can emit), a teacher tail is rounding as well (it would make KL(p||q)
    # infinite): renormalise the support to mass 1, tail 0.
    log_mass = _logsumexp(log_p, -1)
    log_tail = _log1mexp(log_mass).clamp(min=math.log(torch.finfo(teacher_logprobs.dtype).eps))
    no_tail = log_q_tail == NEG_INF
    shift = torch.where(no_tail, -log_mass, _log1mexp(log_tail) - log_mass)
    log_p = log_p + shift.unsqueeze(-1)
    log_p_tail = torch.where(no_tail, NEG_INF, log_tail)

    log_p = torch.cat([log_p, log_p_tail.unsqueeze(-1)], dim=-1)
    log_q = torch.cat([log_q, log_q_tail.unsqueeze(-1)], dim=-1)
    return generalized_divergence(log_p, log_q, beta)


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float = 1.0
) -> Tensor:
    """Generalized JSD(beta) on the full vocabulary, per position: [..., V] -> [...].

    beta = 0 is forward KL(p||q) (mode covering), beta = 1 reverse KL(q||p) (mode seeking),
    0 < beta < 1 is beta KL(p||m) + (1 - beta) KL(q||m) with m = beta p + (1 - beta) q (GKD
    paper Eq. 1; the same convention as TRL's `generalized_jsd_loss`, so results compare).
    """
    check_arguments(beta, temperature)
    dtype = compute_dtype(student_logits, teacher_logits)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return generalized_divergence(log_p, log_q, beta)


def sampled_reverse_kl(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Per-token estimator log q(y) - log p(y) for y ~ q; its expectation is KL(q||p).

    Needs only the teacher's log-prob of the sampled token (`target_logprobs`), so it is the
    cheapest on-policy signal (Tinker / MiniLLM); it is unbiased but high variance.
    """
    return student_logprobs - teacher_logprobs


def policy_gradient_loss(token_logprobs: Tensor, advantages: Tensor) -> Tensor:
    """Per-token REINFORCE surrogate -(A * log q(y)); its gradient is -A * grad log q(y).

    The advantage is detached: no gradient flows through the reward. For the on-policy reverse
    KL use `advantages = -sampled_reverse_kl(...)`, whose expected gradient is that of KL(q||p)
    (the score-function term; the direct term has zero expectation).
    """
    return -(advantages.detach() * token_logprobs)
