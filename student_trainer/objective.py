"""One micro-batch's per-token losses: student rows + teacher signal -> loss terms.

Rows are completion tokens in batch order (sequence by sequence, left to right), the
order both `logits[:, :-1][batch.loss_mask]` and the concatenated teacher rows have. The
student arrives as StudentRows (rows.py): hidden states whose logits are computed a chunk
of rows at a time, so every loss here is written per chunk of logits and mapped over them.
What the distillation loss is, is the run's Objective (teacher_client/objectives.py, chosen
by method.loss); this module maps it over the chunks, and holds the trainer's other terms
(the next-token NLL, the RL reward's policy gradient).
"""

from __future__ import annotations

from functools import partial

import torch

from student_trainer.losses import policy_gradient_loss
from student_trainer.rollouts import Batch
from student_trainer.rows import StudentRows
from teacher_client.objectives import Objective, TeacherRows, target_logprobs


def completion_rows(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits [N, V] at the positions that predict completion tokens, and targets [N]."""
    mask = batch.loss_mask.to(logits.device)
    return logits[:, :-1][mask], batch.input_ids.to(logits.device)[:, 1:][mask]


def token_logprobs(
    rows: StudentRows, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log q(y) per row [N], in float32, a chunk of rows at a time (rows.py)."""
    return rows.map(partial(target_logprobs, temperature=temperature), targets)


def divergence(
    rows: StudentRows, targets: torch.Tensor, teacher: TeacherRows, objective: Objective
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss to differentiate, per-token divergence to report), both [N]:
    `objective.token_losses` a chunk of rows at a time, so the student's logits exist a
    chunk at a time whatever the loss."""

    def chunk(
        logits: torch.Tensor, targets: torch.Tensor, *teacher_rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return objective.token_losses(logits, targets, TeacherRows(*teacher_rows))

    return rows.map(chunk, targets, *teacher.columns())


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
