"""Distillation losses: pure tensor functions, p = teacher, q = student (docs/design.md).

Every divergence is per position (the vocabulary / bucket axis, the last one, is reduced) and is
computed in float32 (float64 when given float64, so that gradcheck works), whatever the input
dtype. Zero-probability buckets (log-prob -inf, e.g. from -inf logits) contribute exactly 0,
and the masked branches are sanitised before `torch.where` so that they cannot leak NaN
gradients either (a NaN in the branch `where` discards still poisons the backward pass).

The divergence core and `sparse_generalized_jsd` (top-k + tail) live in the client
distribution (teacher_client/losses.py), so that the TRL adapter trains on the very function
this trainer does; they are imported here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from teacher_client.losses import (
    check_arguments,
    compute_dtype,
    generalized_divergence,
    sparse_generalized_jsd,
)

__all__ = [
    "generalized_jsd",
    "policy_gradient_loss",
    "sampled_reverse_kl",
    "sparse_generalized_jsd",
    "token_level_loss",
]


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


def token_level_loss(per_token: Tensor, mask: Tensor, num_tokens: int | Tensor) -> Tensor:
    """Scalar sum(per_token * mask) / num_tokens: the token-level mean of GKD Eq. 2.

    `num_tokens` counts the completion tokens of the WHOLE accumulated batch (every
    micro-batch of one optimizer step), not of this micro-batch: summing the micro-batch
    losses then gives exactly the one-big-batch mean, and every token weighs the same whatever
    the length of its sequence (a per-micro-batch mean would up-weight short micro-batches).
    Masked positions are dropped with `where`, so NaN/inf there (e.g. padding) never leaks.
    """
    if bool((torch.as_tensor(num_tokens) <= 0).any()):
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    kept = torch.where(mask.bool(), per_token * mask, torch.zeros_like(per_token))
    return kept.sum() / num_tokens
