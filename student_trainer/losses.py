"""Distillation losses: pure tensor functions, p = teacher, q = student (docs/design.md).

Every divergence is per position (the vocabulary / bucket axis, the last one, is reduced) and is
computed in float32 (float64 when given float64, so that gradcheck works), whatever the input
dtype. Zero-probability buckets (log-prob -inf, e.g. from -inf logits) contribute exactly 0,
and the masked branches are sanitised before `torch.where` so that they cannot leak NaN
gradients either (a NaN in the branch `where` discards still poisons the backward pass).

The divergences themselves (the generalized JSD on the full vocabulary and on the top-k +
tail support, the sampled-token reverse KL and its policy-gradient surrogate) live in the
client distribution (teacher_client/losses.py), so that the built-in objectives
(teacher_client/objectives.py) and the TRL adapter train on the very functions this trainer
does; they are imported here. The token-level reduction is the trainer's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from teacher_client.losses import (
    generalized_jsd,
    policy_gradient_loss,
    sampled_reverse_kl,
    sparse_generalized_jsd,
)

__all__ = [
    "generalized_jsd",
    "policy_gradient_loss",
    "sampled_reverse_kl",
    "sparse_generalized_jsd",
    "token_level_loss",
]


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
