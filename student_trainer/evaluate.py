"""Evaluation on held-out prompts: the task metrics and the divergence to the teacher.

As the GKD paper does, the metrics are computed twice: on the student's greedy
completions, and on its samples at the rollout temperature (`sampled_<metric>`), drawn
from a fixed seed so every evaluation sees comparable draws. The divergences use those
same samples, scored by the teacher: the on-policy quantity that distillation drives down.
`forward_kl` and `reverse_kl` are always those on the teacher's top-k + tail support;
`divergence` is the trained objective's own (method.loss: its support, its candidates).

`evaluate` scores a model in memory (the trainer's, during a run); `evaluate_model` loads
any model directory to score it (a student, a checkpoint, the teacher itself), and
`evaluate_split` does so with the config's own student and teacher.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from causal_lm.placement import resolve_device
from causal_lm.sampling import SamplingOptions
from student_trainer.config import FILE_TASK, TaskConfig, TrainConfig, objective_from
from student_trainer.data import decode_completion, prompt_ids, reference_text, task_splits
from student_trainer.losses import sparse_generalized_jsd
from student_trainer.objective import TeacherRows, completion_rows
from student_trainer.rollouts import Batch, build_batch, sample_completions
from student_trainer.student import load_student
from student_trainer.tasks import TASKS, Example
from student_trainer.teacher import Teacher, connect, handshake
from student_trainer.user_metric import load_metric, metric_scores
from teacher_client.objectives import Objective, scaled_logits

EVAL_SEED_OFFSET = 7919  # evaluation draws never share a stream with training rollouts

Scorer = Callable[[list[str], list[Example]], dict[str, float]]


def task_scorer(task: TaskConfig, tokenizer: Any, eos_ids: Collection[int]) -> Scorer:
    """The task's metrics on a list of predictions, the primary one first: a built-in
    task's (percent), task.metric's on the user's data (as it returns them), or none."""
    if task.name != FILE_TASK:
        return TASKS[task.name].score
    if not task.metric:
        return lambda predictions, examples: {}
    function = load_metric(task.metric)

    def score(predictions: list[str], examples: list[Example]) -> dict[str, float]:
        references = [reference_text(tokenizer, e, eos_ids) for e in examples]
        return metric_scores(function, task.metric, predictions, references)

    return score


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
    objective: Objective | None = None,
) -> dict[str, float]:
    """{"metric": the task's primary metric (greedy), each task metric by name (greedy),
    "sampled_metric" and "sampled_<name>" (sampled), and with a teacher "forward_kl",
    "reverse_kl" (top-k + tail) and "divergence" (the objective's, by default the one
    method.loss names)}, divergences per completion token. Built-in metrics are in percent;
    the user's data has only task.metric's (as it returns them), or none: the divergences
    alone."""
    if not examples:
        return {}
    if objective is None:
        objective = objective_from(config.method)
    score = task_scorer(config.task, tokenizer, eos_ids)
    rollout = config.rollout
    device = next(model.parameters()).device
    vocab = len(tokenizer)
    sampling = dict(vocab_size=vocab, eos_ids=eos_ids, pad_id=pad_id)
    generator = torch.Generator(device=device).manual_seed(config.run.seed + EVAL_SEED_OFFSET)
    totals = {"forward_kl": 0.0, "reverse_kl": 0.0, "divergence": 0.0}
    predictions: list[str] = []
    sampled: list[str] = []
    tokens = 0
    size = config.optim.batch_size
    for start in range(0, len(examples), size):
        chunk = examples[start : start + size]
        prompts = [prompt_ids(tokenizer, e) for e in chunk]
        greedy = SamplingOptions(rollout.max_new_tokens, temperature=0.0)
        completions = sample_completions(model, prompts, greedy, generator=None, **sampling)
        predictions += [decode_completion(tokenizer, ids, eos_ids) for ids in completions]
        options = SamplingOptions(rollout.max_new_tokens, rollout.temperature, rollout.top_p)
        samples = sample_completions(model, prompts, options, generator=generator, **sampling)
        sampled += [decode_completion(tokenizer, ids, eos_ids) for ids in samples]
        if teacher is None:
            continue
        batch = build_batch(prompts, samples, eos_ids=eos_ids, pad_id=pad_id)
        logits = model(
            input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
        ).logits
        student, targets = completion_rows(logits[..., :vocab], batch)
        candidates = _candidates(student, batch, objective.candidates)
        # the objective's signal, and the top-k that forward_kl and reverse_kl are taken on
        options = dataclasses.replace(objective.score_options(), top_k=objective.top_k)
        results = teacher.submit_score(
            batch.sequences,
            batch.prompt_lens,
            options,
            candidates=None if candidates is None else [c.numpy() for c in candidates],
        ).result()
        topk = TeacherRows.from_results(results).to(device)
        scaled = scaled_logits(student, objective.temperature)
        for name, beta in (("forward_kl", 0.0), ("reverse_kl", 1.0)):
            per_token = sparse_generalized_jsd(
                scaled, topk.support_ids, topk.support_logprobs, beta
            )
            totals[name] += float(per_token.sum())
        if candidates is None:
            signal = topk
        else:  # the union support: top-k ids, then the student's own
            signal = TeacherRows.from_results(results, candidates).to(device)
        _, divergence = objective.token_losses(student, targets, signal)
        totals["divergence"] += float(divergence.sum())
        tokens += batch.num_tokens
    result: dict[str, float] = {}
    scores = score(predictions, examples)
    if scores:  # the primary metric is the first
        result = {"metric": next(iter(scores.values())), **scores}
    sampled_scores = score(sampled, examples)
    if sampled_scores:
        result["sampled_metric"] = next(iter(sampled_scores.values()))
        result.update({f"sampled_{name}": value for name, value in sampled_scores.items()})
    if teacher is not None:
        result.update({k: totals[k] / tokens for k in ("forward_kl", "reverse_kl", "divergence")})
    return result


def _candidates(rows: torch.Tensor, batch: Batch, count: int) -> list[torch.Tensor] | None:
    """The student's own top-`count` ids [T_i, count] of each sequence's completion rows
    (rows: [N, V] logits), for a union support as training has it; None for 0."""
    if not count:
        return None
    ids = rows.topk(count, dim=-1).indices.cpu()
    return list(ids.split(batch.loss_mask.sum(dim=1).tolist()))


def evaluate_model(
    model_dir: str | Path,
    config: TrainConfig,
    split: str = "validation",
    *,
    size: int | None = None,
    teacher: Teacher | None = None,
) -> dict[str, float]:
    """`evaluate` of the model in `model_dir` (in student.dtype on student.device) on the
    first `size` prompts of a split (default: all of it); divergences to `teacher` when one
    is given, after the tokenizer handshake."""
    student = load_student(model_dir, config.student.dtype, resolve_device(config.student.device))
    objective = objective_from(config.method)
    if teacher is not None:
        handshake(teacher, student.tokenizer, config.teacher, objective)
    examples = getattr(task_splits(config.task, student.tokenizer), split)[:size]
    return evaluate(
        student.model.eval(),
        student.tokenizer,
        teacher,
        examples,
        config,
        eos_ids=student.eos_ids,
        pad_id=student.pad_id,
        objective=objective,
    )


def evaluate_split(
    config: TrainConfig,
    split: str = "test",
    *,
    checkpoint: str | Path | None = None,
    size: int | None = None,
) -> dict[str, float]:
    """`evaluate_model` of student.model or a run's checkpoint, with divergences when the
    config names a teacher."""
    teacher = connect(config.teacher, required=config.uses_teacher)
    try:
        model_dir = config.student.model if checkpoint is None else checkpoint
        return evaluate_model(model_dir, config, split, size=size, teacher=teacher)
    finally:
        if teacher is not None:
            teacher.close()


@torch.no_grad()
def decoded_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[Example],
    config: TrainConfig,
    temperature: float,
    *,
    eos_ids: frozenset[int],
    pad_id: int,
) -> dict[str, float]:
    """The task's metrics (by name) of one decoding of `examples` at `temperature` (0:
    greedy), drawn as `evaluate` draws its samples: the same seed and batches, so 1.0 gives
    its sampled metrics again."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.run.seed + EVAL_SEED_OFFSET)
    options = SamplingOptions(config.rollout.max_new_tokens, temperature, config.rollout.top_p)
    texts: list[str] = []
    size = config.optim.batch_size
    for start in range(0, len(examples), size):
        prompts = [prompt_ids(tokenizer, e) for e in examples[start : start + size]]
        completions = sample_completions(
            model,
            prompts,
            options,
            generator=generator if temperature > 0 else None,
            vocab_size=len(tokenizer),
            eos_ids=eos_ids,
            pad_id=pad_id,
        )
        texts += [decode_completion(tokenizer, ids, eos_ids) for ids in completions]
    return task_scorer(config.task, tokenizer, eos_ids)(texts, examples)


def evaluate_temperatures(
    config: TrainConfig,
    split: str,
    temperatures: Collection[float],
    *,
    checkpoint: str | Path | None = None,
    size: int | None = None,
) -> dict[str, dict[str, float]]:
    """{f"{t:g}": the task's metrics of a decoding at t} for the student (or a checkpoint)
    on the first `size` prompts of a split, no teacher: how a model's quality moves with
    its sampling temperature, for choosing that temperature on validation."""
    model_dir = config.student.model if checkpoint is None else checkpoint
    student = load_student(model_dir, config.student.dtype, resolve_device(config.student.device))
    examples = getattr(task_splits(config.task, student.tokenizer), split)[:size]
    model = student.model.eval()
    return {
        f"{t:g}": decoded_scores(
            model, student.tokenizer, examples, config, t, eos_ids=student.eos_ids,
            pad_id=student.pad_id,
        )
        for t in temperatures
    }  # fmt: skip
