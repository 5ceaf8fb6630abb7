"""Evaluation on held-out prompts: the task metric and the divergence to the teacher.

The metric uses the student's greedy completions. The divergences use the student's own
samples (rollout temperature, a fixed seed so every evaluation sees comparable draws),
scored by the teacher: the on-policy quantity that distillation drives down.
"""

from __future__ import annotations

from typing import Any

import torch

from student_trainer.config import TrainConfig
from student_trainer.data import encode_prompt
from student_trainer.losses import sparse_generalized_jsd
from student_trainer.objective import TeacherRows, completion_rows
from student_trainer.rollouts import build_batch, sample_completions
from student_trainer.tasks import TASKS, Example
from student_trainer.teacher import Teacher
from teacher_service.sampling import SamplingOptions

EVAL_SEED_OFFSET = 7919  # evaluation draws never share a stream with training rollouts


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    teacher: Teacher | None,
    examples: list[Example],
    config: TrainConfig,
    *,
    eos_ids: frozenset[int],
    pad_id: int,
) -> dict[str, float]:
    """{"metric": the task's primary metric, each task metric by name, and with a teacher
    "forward_kl", "reverse_kl", "divergence"}. Metrics are in percent."""
    if not examples:
        return {}
    task, rollout, method = TASKS[config.task.name], config.rollout, config.method
    device = next(model.parameters()).device
    vocab = len(tokenizer)
    sampling = dict(vocab_size=vocab, eos_ids=eos_ids, pad_id=pad_id)
    generator = torch.Generator(device=device).manual_seed(config.run.seed + EVAL_SEED_OFFSET)
    totals = {"forward_kl": 0.0, "reverse_kl": 0.0, "divergence": 0.0}
    predictions: list[str] = []
    tokens = 0
    size = config.optim.batch_size
    for start in range(0, len(examples), size):
        chunk = examples[start : start + size]
        prompts = [encode_prompt(tokenizer, e.prompt) for e in chunk]
        greedy = SamplingOptions(rollout.max_new_tokens, temperature=0.0)
        for ids in sample_completions(model, prompts, greedy, generator=None, **sampling):
            kept = [t for t in ids if t not in eos_ids]
            predictions.append(tokenizer.decode(kept, skip_special_tokens=True))
        if teacher is None:
            continue
        options = SamplingOptions(rollout.max_new_tokens, rollout.temperature, rollout.top_p)
        samples = sample_completions(model, prompts, options, generator=generator, **sampling)
        batch = build_batch(prompts, samples, eos_ids=eos_ids, pad_id=pad_id)
        results = teacher.score(
            batch.sequences, batch.prompt_lens, top_k=method.top_k, temperature=method.temperature
        )
        rows = TeacherRows.from_results(results).to(device)
        logits = model(
            input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
        ).logits
        student, _ = completion_rows(logits[..., :vocab], batch)
        student = student.float() / method.temperature
        for name, beta in (("forward_kl", 0.0), ("reverse_kl", 1.0), ("divergence", method.beta)):
            per_token = sparse_generalized_jsd(
                student, rows.support_ids, rows.support_logprobs, beta
            )
            totals[name] += float(per_token.sum())
        tokens += batch.num_tokens
    scores = task.score(predictions, examples)
    result = {"metric": scores[task.metric_name], **scores}
    if teacher is not None:
        result.update({k: totals[k] / tokens for k in ("forward_kl", "reverse_kl", "divergence")})
    return result
