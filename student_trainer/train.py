"""The training loop: GKD (Algorithm 1 of Agarwal et al.) in plain PyTorch.

Each optimizer step:
  1. with probability lambda the step is on-policy (student samples), else it uses the
     dataset's outputs (or the teacher's, for SeqKD); the draw is seeded;
  2. every micro-batch of the step is built and handed to the teacher at once
     (microbatch.py), so the teacher scores micro-batch i while the student samples i + 1
     and runs its forward passes (the parameters do not change within a step: no staleness);
     with rollout.max_staleness = k > 0, step t starts by building step t + k's, so the
     teacher scores them while k steps train (rollout_queue.py);
  3. each micro-batch's token losses are summed and divided by the completion-token count
     of the whole step (all micro-batches), then backward; clip, AdamW, schedule.

`Trainer.train_step` reads in that order: take the step's rollout, ask the teacher (wait
for its scores), take the loss per micro-batch, step, record. A step whose teacher stays
out of reach past teacher.timeout_s is taken on no rank: the failure protocol (rewind the
streams, put the rollout back, tell every rank) is step_guard.py's, beside the loop.

What it orchestrates lives elsewhere: the student (student.py), the teacher, remote or
in-process (teacher.py), the losses (objective.py), the optimizer, schedule, random
streams and checkpoints (run_state.py), and torchrun's world (distributed.py).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from causal_lm.placement import resolve_device
from student_trainer.checkpoint import resume_checkpoint
from student_trainer.config import (
    ConfigError,
    RunConfig,
    StudentConfig,
    TrainConfig,
    objective_from,
    to_dict,
)
from student_trainer.data import ExampleStream, training_splits
from student_trainer.distributed import (
    World,
    data_parallel,
    destroy_process_group,
    device_for,
    from_environment,
    init_process_group,
)
from student_trainer.evaluate import evaluate
from student_trainer.lora import is_adapter_dir, trainable_parameters
from student_trainer.losses import token_level_loss
from student_trainer.metrics import MetricsLog
from student_trainer.microbatch import MicroBatch, MicroBatchBuilder
from student_trainer.objective import (
    TeacherRows,
    divergence,
    group_advantages,
    reward_loss,
    token_logprobs,
)
from student_trainer.prometheus_export import PrometheusExport
from student_trainer.rollout_queue import Rollout, RolloutQueue
from student_trainer.rows import StudentRows
from student_trainer.run_state import RunState
from student_trainer.step_guard import StepGuard
from student_trainer.student import Student, load_student
from student_trainer.teacher import Teacher, TeacherOutage, connect, handshake, is_outage
from teacher_client import ScoreResult, TeacherServiceError


@dataclass
class _StepSums:
    """What a step adds up over its micro-batches, on this rank."""

    loss: float = 0.0
    divergence: float = 0.0
    rewards: list[float] = field(default_factory=list)
    teacher_latency_s: float = 0.0  # the teacher's calls' own time
    teacher_wait_s: float = 0.0  # the time the step waited for them

    def shared(self) -> list[float]:
        """What the record reports summed over the world: the loss, the divergence, the
        rewards' sum and count."""
        return [self.loss, self.divergence, sum(self.rewards), len(self.rewards)]


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # per step, this process's steps only
    evaluations: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """One run, step by step; `train()` drives it and logs.

    Under torchrun it is one rank of a data-parallel world (distributed.py says who does
    what); alone it is a world of one and nothing distributed happens. The teacher, given
    or connected from the config, belongs to it from here on: close() closes it.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: str | None = None,
        teacher: Teacher | None = None,
        world: World | None = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(config.run.out_dir)
        self.world = world if world is not None else from_environment()
        if config.optim.batch_size < self.world.size:
            raise ConfigError(
                f"optim.batch_size: {config.optim.batch_size} prompts per micro-batch cannot be "
                f"shared by {self.world.size} ranks (it is the global batch: >= 1 per rank)"
            )
        device = device_for(self.world, resolve_device(config.student.device))
        init_process_group(self.world, device)
        checkpoint = resume_checkpoint(resume, self.out_dir)
        self.student = _load_student(config.student, checkpoint, device, seed=config.run.seed)
        self.trained = data_parallel(self.student.completion_forward, self.world)
        if teacher is None:
            # a thread for every micro-batch of a step: all of them are in flight at once
            workers = max(2, config.optim.grad_accum)
            teacher = connect(config.teacher, required=config.uses_teacher, workers=workers)
        self.objective = objective_from(config.method)  # the distillation loss (method.loss)
        if teacher is not None:
            handshake(teacher, self.student.tokenizer, config.teacher, self.objective)
        self.teacher = teacher
        self.splits = training_splits(config.task, config.method, self.student.tokenizer)
        stream = ExampleStream(self.splits.train, seed=config.run.seed)
        self.state = RunState.start(
            config.optim,
            self.student.model,
            stream,
            self.world,
            device,
            seed=config.run.seed,
            autocast=config.student.autocast,
        )
        self.precision = self.state.precision
        if checkpoint:
            self.state.load(checkpoint, self.world)
        self.builder = MicroBatchBuilder(
            self.student,
            teacher,
            config.method,
            config.rollout,
            teacher_dtype=config.teacher.dtype,
            seed=config.run.seed,
            generator=self.state.rollout_generator,
            objective=self.objective,
        )
        self.rollouts = RolloutQueue(self.builder, self._build_step, config.rollout.max_staleness)
        self.rollouts.restore(self.state.pending_rollouts)
        self.guard = StepGuard(
            config.teacher, self.state, self.rollouts, self.world, self.student.device
        )

    @property
    def step(self) -> int:
        return self.state.step

    def save(self) -> Path | None:
        """Every rank must call it (their sampling streams are gathered); rank 0 writes."""
        student = self.student
        self.state.pending_rollouts = self.rollouts.pending()
        return self.state.save(
            self.out_dir, student.saved, student.tokenizer, self.config, self.world
        )

    def _build_step(self, step: int, version: int) -> Rollout:
        """Step `step`'s coin and micro-batches, each submitted to the teacher as soon as it
        exists, sampled with the weights as they are (optimizer step `version`'s)."""
        m, o = self.config.method, self.config.optim
        on_policy = m.name == "gkd" and self.state.mixing.random() < m.lmbda
        group = m.samples_per_prompt if on_policy else 1
        micro_batches: list[MicroBatch] = []
        for index in range(o.grad_accum):
            examples = self.world.shard(self.state.stream.take(o.batch_size))
            examples = [e for e in examples for _ in range(group)]
            micro_batches.append(
                self.builder.build(examples, on_policy=on_policy, step=step, index=index)
            )
        return Rollout(step, version, on_policy, micro_batches)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step of Algorithm 1: take the step's rollout, ask the teacher for
        its scores, take the loss micro-batch by micro-batch, step, record.

        A teacher call that fails with an outage (teacher.is_outage) fails the step on
        every rank with nothing stepped: the guard (step_guard.py) undoes it and raises
        TeacherOutage, and train() writes a checkpoint that resumes exactly."""
        started = time.perf_counter()
        self.student.model.train()
        # the student's samples with probability lambda, else the dataset's outputs (or the
        # teacher's: SeqKD), as the step was built (_build_step); and the whole world's
        # completion tokens: every rank's loss is a share of one token mean
        rollout, total_tokens = self.guard.take(self.state.step)
        sums = _StepSums()
        for index, mb in enumerate(rollout.micro_batches):
            last = index == len(rollout.micro_batches) - 1
            # DDP all-reduces during the last micro-batch's backward only (it averages:
            # hence the world size factor, which turns the average back into the sum)
            accumulate = self.world.distributed and not last
            with self.trained.no_sync() if accumulate else contextlib.nullcontext():
                with self.precision.autocast():  # student.autocast: forward and loss only
                    rows, targets = self.student.completion_rows(mb.batch, self.trained)
                    results = self._teacher_scores(mb, sums)
                    if self.guard.failed:  # not to be stepped: a zero loss keeps DDP in step
                        per_token = -token_logprobs(rows, targets) * 0.0
                    else:
                        per_token = self._micro_batch_loss(rows, targets, mb, results, sums)
                    mask = torch.ones_like(per_token, dtype=torch.bool)
                    loss = token_level_loss(per_token, mask, total_tokens)
                self.precision.backward(loss * self.world.size)
            sums.loss += float(loss.detach())
        totals = self.guard.settle(rollout, sums.shared())
        grad_norm, lr = self._optimizer_step()
        elapsed = time.perf_counter() - started
        return self._record(rollout, total_tokens, sums, totals, grad_norm, lr, elapsed)

    def _teacher_scores(self, mb: MicroBatch, sums: _StepSums) -> list[ScoreResult] | None:
        """The teacher's scores of a micro-batch, waited for (the wait and the call's own
        time go to `sums`); None for sft / seqkd's, or once this rank's teacher failed."""
        if mb.scores is None or self.guard.failed:
            return None
        waited = time.perf_counter()
        results = self.guard.scores(mb.scores)
        sums.teacher_wait_s += time.perf_counter() - waited
        sums.teacher_latency_s += mb.scores.latency_s
        return results

    def _micro_batch_loss(
        self,
        rows: StudentRows,
        targets: torch.Tensor,
        mb: MicroBatch,
        results: list[ScoreResult] | None,
        sums: _StepSums,
    ) -> torch.Tensor:
        """The micro-batch's per-token loss: next-token NLL on the given outputs (sft,
        seqkd), else the method's divergence to the teacher (RL + GKD: and the reward
        term); the divergence and the rewards go to `sums`, for the record."""
        m, device = self.config.method, self.student.device
        if mb.scores is None:  # sft / seqkd: next-token NLL on the given outputs
            return -token_logprobs(rows, targets)
        teacher = TeacherRows.from_results(results, mb.candidates).to(device)
        per_token, div = divergence(rows, targets, teacher, self.objective)
        sums.divergence += float(div.sum())
        if mb.rewards is not None:
            advantages = group_advantages(mb.rewards, m.samples_per_prompt)
            per_token = m.alpha * per_token + (1 - m.alpha) * reward_loss(
                rows, targets, mb.batch, advantages.to(device)
            )
            sums.rewards.extend(mb.rewards)
        return per_token

    def _optimizer_step(self) -> tuple[float, float]:
        """Clip, AdamW, schedule; the step counted. (The gradient norm, the learning rate.)"""
        state, max_norm = self.state, self.config.optim.max_grad_norm
        self.precision.unscale(state.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            trainable_parameters(self.student.model),
            max_norm if max_norm > 0 else float("inf"),
        )
        lr = state.scheduler.get_last_lr()[0]
        self.precision.step(state.optimizer)
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        return float(grad_norm), lr

    def _record(
        self,
        rollout: Rollout,
        total_tokens: int,
        sums: _StepSums,
        totals: list[float],
        grad_norm: float,
        lr: float,
        elapsed: float,
    ) -> dict[str, Any]:
        """The step's metrics: `totals` are the world's sums of `sums.shared()`; the
        teacher's times are this rank's."""
        loss_sum, divergence_sum, reward_sum, reward_count = totals
        record: dict[str, Any] = {
            "step": self.state.step,
            "loss": loss_sum,
            "on_policy": rollout.on_policy,
            "staleness": rollout.staleness,
            "tokens": total_tokens,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_s": elapsed,
            "tokens_per_s": total_tokens / elapsed,
        }
        if self.config.method.name == "gkd":
            latency, wait = sums.teacher_latency_s, sums.teacher_wait_s
            record.update(
                divergence=divergence_sum / total_tokens,
                teacher_latency_s=latency,
                teacher_wait_s=wait,
                hidden_fraction=max(0.0, 1 - wait / latency) if latency > 0 else 0.0,
            )
        if reward_count:
            record["reward"] = reward_sum / reward_count
        return record

    def evaluate(self, split: str = "validation") -> dict[str, float]:
        """evaluate.py's metrics of the model as it is now, on run.eval_size prompts."""
        examples = getattr(self.splits, split)[: self.config.run.eval_size]
        student = self.student
        was_training = student.model.training
        student.model.eval()
        try:
            return evaluate(
                student.model,
                student.tokenizer,
                self.teacher,
                examples,
                self.config,
                eos_ids=student.eos_ids,
                pad_id=student.pad_id,
                objective=self.objective,
            )
        except TeacherServiceError as error:
            if not is_outage(error):
                raise
            # under torchrun rank 0 evaluates alone: the others cannot join a checkpoint now
            every_rank = not self.world.distributed
            raise TeacherOutage(self.config.teacher, str(error), every_rank=every_rank) from None
        finally:
            student.model.train(was_training)

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()
        destroy_process_group(self.world)


def _load_student(
    s: StudentConfig, checkpoint: Path | None, device: torch.device, *, seed: int
) -> Student:
    """The student to train: student.model, or the checkpoint resumed, with its adapters
    (student.lora; new ones drawn from run.seed, `seed`) and gradient checkpointing. A
    checkpoint must be of the run's kind: a LoRA run's holds adapters, a full run's a
    whole model (the optimizer state of one does not fit the other)."""
    lora = s.lora if s.lora.r > 0 else None
    if checkpoint is not None and is_adapter_dir(checkpoint) != (lora is not None):
        held = "LoRA adapters" if is_adapter_dir(checkpoint) else "a whole model"
        raise ConfigError(
            f"student.lora.r: the checkpoint {checkpoint} holds {held}; resume it with the "
            "student.lora settings it was trained with"
        )
    return load_student(
        checkpoint or s.model,
        s.dtype,
        device,
        s.loss_chunk_rows,
        lora=lora,
        base=s.model,
        gradient_checkpointing=s.gradient_checkpointing,
        seed=seed,
    )


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    shown = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
    if "divergence" in record:
        shown["div"] = f"{record['divergence']:.4f}"
        shown["teacher"] = f"{record['teacher_latency_s'] * 1000:.0f}ms"
        shown["hidden"] = f"{record['hidden_fraction']:.0%}"
    return shown


def train(
    config: TrainConfig,
    *,
    resume: str | None = None,
    teacher: Teacher | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Run (or continue) training to config.optim.steps; `stop_after` ends early (tests).

    Under torchrun every rank runs this; rank 0 alone evaluates, logs and shows progress.

    A teacher service out of reach for longer than teacher.timeout_s (TeacherOutage, from
    a step or an evaluation) stops the run: a checkpoint of the last completed step is
    written, and the error, naming it, is raised. Resumed from it once the service is
    back, the run computes the steps the uninterrupted run would have. Under torchrun,
    when only rank 0 met it (evaluating), no checkpoint can be written: rank 0 raises,
    torchrun stops the others, and the latest checkpoint before it resumes (exactly, but
    the steps since are computed again).
    """
    trainer = Trainer(config, resume=resume, teacher=teacher)
    run, total, main = config.run, config.optim.steps, trainer.world.is_main
    metrics: MetricsLog | None = None
    result = TrainResult(trainer.out_dir, trainer.step)
    last = total if stop_after is None else min(total, stop_after)

    def log_evaluation() -> None:
        if metrics is not None:
            evaluation = {"step": trainer.step, **_prefixed(trainer.evaluate())}
            metrics.write(evaluation)
            result.evaluations.append(evaluation)
            if trainer.step:
                bar.write(_describe(evaluation))

    try:
        if main:
            metrics = _metrics_log(run, trainer)
            (trainer.out_dir / "config.yaml").write_text(json.dumps(to_dict(config), indent=2))
        bar = tqdm(
            total=total,
            initial=trainer.step,
            disable=not (run.progress and main),
            desc="train",
            dynamic_ncols=True,
        )
        if trainer.step == 0:
            log_evaluation()
        while trainer.step < last:
            record = trainer.train_step()
            if metrics is not None:
                metrics.write(record)
            result.losses.append(record["loss"])
            bar.update(1)
            bar.set_postfix(_postfix(record), refresh=False)
            done = trainer.step == total
            if done or (run.eval_every and trainer.step % run.eval_every == 0):
                log_evaluation()
            if (
                done
                or trainer.step == last
                or (run.save_every and trainer.step % run.save_every == 0)
            ):
                trainer.save()
        bar.close()
        trainer.world.barrier()  # no rank leaves while rank 0 still writes
        result.steps = trainer.step
    except TeacherOutage as outage:
        bar.close()
        if outage.every_rank:
            outage.step, outage.checkpoint = trainer.step, trainer.save()
            trainer.world.barrier()  # no rank fails (torchrun stops the rest) mid-write
        raise
    finally:
        if metrics is not None:
            metrics.close()
        trainer.close()
    return result


def _metrics_log(run: RunConfig, trainer: Trainer) -> MetricsLog:
    """Rank 0's log: metrics.jsonl, TensorBoard, and Prometheus when run.metrics_port is set."""
    prometheus = PrometheusExport(run.metrics_host, run.metrics_port) if run.metrics_port else None
    return MetricsLog(trainer.out_dir, trainer.step, prometheus)


def _prefixed(values: dict[str, float]) -> dict[str, float]:
    return {f"eval/{k}": v for k, v in values.items()}


def _describe(evaluation: dict[str, Any]) -> str:
    parts = [f"{k.removeprefix('eval/')} {v:.4f}" for k, v in evaluation.items() if k != "step"]
    return f"eval @ step {evaluation['step']}: " + ", ".join(parts)
