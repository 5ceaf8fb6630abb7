"""One micro-batch of a step: its examples, the sequences trained on, and what the loss
needs besides the student's logits (the teacher's scores, on their way, and rewards).

The completions come from one of three sources (GKD paper, Algorithm 1): the student's own
samples on an on-policy step, the teacher's outputs for SeqKD, the dataset's references
otherwise. A distillation micro-batch goes to the teacher as soon as it exists, so the
teacher scores micro-batch i while the student samples i + 1 and runs its forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from causal_lm.sampling import SamplingOptions
from student_trainer.config import MethodConfig, RolloutConfig
from student_trainer.data import decode_completion, encode_answer, prompt_ids
from student_trainer.rollouts import Batch, build_batch, sample_completions
from student_trainer.student import Student
from student_trainer.tasks import REWARDS, Example
from student_trainer.teacher import ScoreFuture, Teacher
from teacher_client import ScoreOptions
from teacher_client.objectives import Objective


@dataclass
class MicroBatch:
    batch: Batch
    examples: list[Example]
    candidates: list[torch.Tensor] | None = None  # the student's own top-m ids per position
    scores: ScoreFuture | None = None  # the teacher's signal, when distilling
    rewards: list[float] | None = None  # RL + GKD (method.alpha < 1)


@dataclass
class MicroBatchBuilder:
    """What a micro-batch is built from; one per run (the generator is this rank's stream,
    restored in place on resume). It reads the method and rollout sections, teacher.dtype
    and run.seed, given one by one; the objective says what to ask the teacher for."""

    student: Student
    teacher: Teacher | None
    method: MethodConfig
    rollout: RolloutConfig
    teacher_dtype: str  # teacher.dtype: the wire dtype of the scores asked for
    seed: int  # run.seed: SeqKD's teacher outputs are seeded by it, the step and the index
    generator: torch.Generator
    objective: Objective

    @property
    def score_options(self) -> ScoreOptions:
        """What the objective asks the teacher for, in teacher.dtype."""
        return self.objective.score_options(self.teacher_dtype)

    def build(
        self, examples: list[Example], *, on_policy: bool, step: int, index: int
    ) -> MicroBatch:
        """Micro-batch `index` of `step`: sequences built, scoring submitted, rewards set."""
        m, tokenizer = self.method, self.student.tokenizer
        distill = m.name == "gkd"
        prompts = [prompt_ids(tokenizer, e) for e in examples]
        completed = self.completions(prompts, examples, on_policy=on_policy, step=step, index=index)
        batch = build_batch(
            prompts, completed, eos_ids=self.student.eos_ids, pad_id=self.student.pad_id
        )
        item = MicroBatch(batch, examples)
        if distill and self.objective.candidates:
            item.candidates = student_candidates(self.student, batch, self.objective.candidates)
        if distill:
            item.scores = submit_scores(self.teacher, batch, item.candidates, self.score_options)
        if m.alpha < 1.0:
            reward = REWARDS[m.reward]
            item.rewards = [
                reward(decode_completion(tokenizer, ids, self.student.eos_ids), example)
                for ids, example in zip(batch.completions, examples)
            ]
        return item

    def completions(
        self,
        prompts: list[list[int]],
        examples: list[Example],
        *,
        on_policy: bool,
        step: int,
        index: int,
    ) -> list[list[int]]:
        """What each prompt is completed with: student samples, the teacher's outputs (SeqKD,
        seeded by run, step and micro-batch) or the dataset's answers."""
        m, r, student = self.method, self.rollout, self.student
        if on_policy:
            options = SamplingOptions(r.max_new_tokens, r.temperature, r.top_p)
            return sample_completions(
                student.model,
                prompts,
                options,
                vocab_size=student.vocab,
                eos_ids=student.eos_ids,
                pad_id=student.pad_id,
                generator=self.generator,
            )
        if m.name == "seqkd":
            seed = (self.seed * 1_000_003 + step) * 1_009 + index
            outputs = self.teacher.generate(
                prompts, max_new_tokens=r.max_new_tokens, temperature=m.seqkd_temperature, seed=seed
            )
            return [o.token_ids for o in outputs]
        return [encode_answer(student.tokenizer, e.answer) for e in examples]


def student_candidates(student: Student, batch: Batch, count: int) -> list[torch.Tensor]:
    """The student's own top-`count` ids at each completion position (the union support),
    from a forward of its own without gradients, its logits a chunk of rows at a time."""
    with torch.no_grad():
        rows, _ = student.completion_rows(batch)
        ids = rows.map(lambda logits: logits.topk(count, dim=-1).indices).cpu()  # [N, count]
    return list(ids.split(batch.loss_mask.sum(dim=1).tolist()))


def submit_scores(
    teacher: Teacher, batch: Batch, candidates: list[torch.Tensor] | None, options: ScoreOptions
) -> ScoreFuture:
    """Ask the teacher for `options` (the objective's) at every completion position."""
    return teacher.submit_score(
        batch.sequences,
        batch.prompt_lens,
        options,
        candidates=None if candidates is None else [c.numpy() for c in candidates],
    )
