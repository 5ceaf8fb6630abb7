"""One micro-batch's per-token losses: student rows + teacher signal -> loss terms.

Rows are completion tokens in batch order (sequence by sequence, left to right), the
order both `logits[:, :-1][batch.loss_mask]` and the concatenated teacher rows have. The
student arrives as StudentRows (rows.py): hidden states whose logits are computed a chunk
of rows at a time, so every loss here is written per chunk of logits and mapped over them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import numpy as np
import torch

from student_trainer.config import MethodConfig
from student_trainer.losses import (
    generalized_jsd,
    policy_gradient_loss,
    sampled_reverse_kl,
    sparse_generalized_jsd,
)
from student_trainer.rollouts import Batch
from student_trainer.rows import StudentRows
from teacher_client import ScoreResult


@dataclass
class TeacherRows:
    """The teacher's signal for every completion token of a micro-batch, concatenated."""

    target_logprobs: torch.Tensor  # [N]
    support_ids: torch.Tensor | None  # [N, k + m]: top-k ids, then candidate ids
    support_logprobs: torch.Tensor | None  # [N, k + m]
    full_logprobs: torch.Tensor | None  # [N, V]

    @classmethod
    def from_results(
        cls, results: list[ScoreResult], candidates: list[torch.Tensor] | None = None
    ) -> TeacherRows:
        def cat(name: str) -> torch.Tensor | None:
            parts = [getattr(r, name) for r in results]
            if parts[0] is None:
                return None
            return torch.from_numpy(np.concatenate(parts)).float()

        target, full = cat("target_logprobs"), cat("full_logprobs")
        ids, logprobs = cat("topk_ids"), cat("topk_logprobs")
        if ids is not None:
            ids = ids.long()
        if candidates is not None:
            cand_ids, cand_lp = torch.cat(candidates), cat("candidate_logprobs")
            ids = cand_ids if ids is None else torch.cat([ids, cand_ids], dim=-1)
            logprobs = cand_lp if logprobs is None else torch.cat([logprobs, cand_lp], dim=-1)
        return cls(target, ids, logprobs, full)

    def to(self, device: torch.device) -> TeacherRows:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return TeacherRows(*(move(getattr(self, f.name)) for f in fields(self)))


def completion_rows(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits [N, V] at the positions that predict completion tokens, and targets [N]."""
    mask = batch.loss_mask.to(logits.device)
    return logits[:, :-1][mask], batch.input_ids.to(logits.device)[:, 1:][mask]


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[n, V] logits in float32, divided by the distillation temperature."""
    return logits.float() / temperature


def _target_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log q(y) [n] of rows of logits [n, V] at `temperature`, in float32."""
    log_q = torch.log_softmax(_scaled(logits, temperature), dim=-1)
    return log_q.gather(-1, targets[:, None]).squeeze(-1)


def token_logprobs(
    rows: StudentRows, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log q(y) per row [N], in float32, a chunk of rows at a time (rows.py)."""
    return rows.map(partial(_target_logprobs, temperature=temperature), targets)


def _full_jsd(
    logits: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float, beta: float
) -> torch.Tensor:
    """Generalized JSD [n] of rows of logits [n, V] against the teacher's [n, V]."""
    return generalized_jsd(_scaled(logits, temperature), teacher_logprobs, beta)


def _sparse_jsd(
    logits: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float,
    beta: float,
) -> torch.Tensor:
    """Generalized JSD [n] on the teacher's support [n, k + m] plus the tail bucket."""
    return sparse_generalized_jsd(_scaled(logits, temperature), support_ids, teacher_logprobs, beta)


def divergence(
    rows: StudentRows, targets: torch.Tensor, teacher: TeacherRows, method: MethodConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss to differentiate, per-token divergence to report), both [N].

    The teacher's log-probs come from the service at `method.temperature` already, so only
    the student's logits are divided by it here. Every support goes through `rows.map`, so
    the student's logits exist a chunk of rows at a time.
    """
    t, beta = method.temperature, method.beta
    if method.support == "sampled":
        log_q = token_logprobs(rows, targets, t)
        estimate = sampled_reverse_kl(log_q, teacher.target_logprobs).detach()
        return policy_gradient_loss(log_q, -estimate), estimate
    if method.support == "full":
        value = rows.map(partial(_full_jsd, temperature=t, beta=beta), teacher.full_logprobs)
    else:
        value = rows.map(
            partial(_sparse_jsd, temperature=t, beta=beta),
            teacher.support_ids,
            teacher.support_logprobs,
        )
    return value, value.detach()


def group_advantages(rewards: list[float], group_size: int) -> torch.Tensor:
    """Reward minus the mean reward of the samples drawn for the same prompt."""
    values = torch.tensor(rewards, dtype=torch.float32).view(-1, group_size)
    return (values - values.mean(dim=1, keepdim=True)).flatten()


def reward_loss(
    rows: StudentRows, targets: torch.Tensor, batch: Batch, advantages: torch.Tensor
) -> torch.Tensor:
    """Policy-gradient term for E[r]: each sequence's advantage on each of its tokens."""
    per_token_advantage = advantages.repeat_interleave(batch.loss_mask.sum(dim=1))
    return policy_gradient_loss(token_logprobs(rows, targets), per_token_advantage)
