"""The training loop: GKD (Algorithm 1 of Agarwal et al.) in plain PyTorch.

Each optimizer step:
  1. with probability lambda the step is on-policy (student samples), else it uses the
     dataset's outputs (or the teacher's, for SeqKD); the draw is seeded;
  2. for every micro-batch the sequences are built and sent to the teacher at once, on a
     thread, so the teacher scores micro-batch i while the student samples i + 1 and
     runs its forward passes (the parameters do not change within a step: no staleness);
  3. each micro-batch's token losses are summed and divided by the completion-token count
     of the whole step (all micro-batches), then backward; clip, AdamW, schedule.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from student_trainer.checkpoint import latest_checkpoint, load_state, save_checkpoint
from student_trainer.config import ConfigError, TrainConfig, to_dict
from student_trainer.data import ExampleStream, encode_answer, encode_prompt
from student_trainer.distributed import (
    World,
    destroy_process_group,
    device_for,
    from_environment,
    init_process_group,
)
from student_trainer.evaluate import evaluate
from student_trainer.losses import token_level_loss
from student_trainer.metrics import MetricsLog
from student_trainer.objective import (
    TeacherRows,
    completion_rows,
    divergence,
    group_advantages,
    reward_loss,
    token_logprobs,
)
from student_trainer.rollouts import Batch, build_batch, sample_completions
from student_trainer.tasks import REWARDS, TASKS, Example
from student_trainer.teacher import Teacher, connect
from teacher_client import TeacherClient, TeacherServiceError, TokenizerMismatchError
from teacher_service.backend import eos_token_ids, resolve_device
from teacher_service.codec import torch_dtype
from teacher_service.sampling import SamplingOptions

log = logging.getLogger(__name__)
# rank r samples with its own stream, seeded run.seed + r * RANK_SEED_STRIDE (rank 0: run.seed)
RANK_SEED_STRIDE = 1_000_003


class Deferred:
    """A call run when its result is first asked for, in the asking thread.

    Used for an in-process teacher instead of the thread pool: on CPU it would only fight
    the student for the same cores (and torch called from a second thread slows the
    first one down for good), so its scoring is counted as not hidden at all.
    """

    def __init__(self, call: Callable[[], Any]) -> None:
        self._call, self._done, self._value = call, False, None

    def result(self) -> Any:
        if not self._done:
            self._value, self._done = self._call(), True
        return self._value


@dataclass
class MicroBatch:
    batch: Batch
    examples: list[Example]
    candidates: list[torch.Tensor] | None = None
    scores: Future | Deferred | None = None  # -> (list[ScoreResult], latency seconds)
    rewards: list[float] | None = None


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # per step, this process's steps only
    evaluations: list[dict[str, float]] = field(default_factory=list)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup to 1, then cosine / linear decay to 0 at `total`, or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Holds the run's state; `train()` and the CLI's `eval` are thin wrappers around it.

    Under torchrun it is one rank of a data-parallel world (distributed.py says who does
    what); alone it is a world of one and nothing distributed happens.
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
        self.device = device_for(self.world, resolve_device(config.student.device))
        init_process_group(self.world, self.device)
        checkpoint = self._resolve_resume(resume)
        source = checkpoint or config.student.model
        if not (Path(source) / "config.json").is_file():
            raise ConfigError(f"student.model: {source} is not a model directory (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype(config.student.dtype), local_files_only=True
        ).to(self.device)
        # the module that computes gradients: DDP all-reduces them during backward
        self.trained: torch.nn.Module = self.model
        if self.world.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.trained = DistributedDataParallel(self.model, device_ids=ids)
        self.vocab = len(self.tokenizer)
        rows = self.model.get_output_embeddings().weight.shape[0]
        if rows < self.vocab:
            raise ConfigError(f"student.model: {rows} output rows < {self.vocab} tokens")
        self.eos_ids = frozenset(eos_token_ids(self.model, self.tokenizer))
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        if teacher is not None:
            self._check_tokenizer(teacher)
        self.teacher = teacher if teacher is not None else self._connect_teacher()
        task = TASKS[config.task.name]
        t = config.task
        self.splits = task.splits(t.train_size, t.validation_size, t.test_size, t.seed)
        self.stream = ExampleStream(self.splits.train, seed=config.run.seed)

        torch.manual_seed(config.run.seed)
        o = config.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, o.warmup_steps, o.steps, o.schedule)
        )
        self.rollout_generator = torch.Generator(device=self.device).manual_seed(
            config.run.seed + RANK_SEED_STRIDE * self.world.rank
        )
        self.mixing = random.Random(config.run.seed)  # Algorithm 1's coin, one per step
        self.step = 0
        if checkpoint:
            self._load(checkpoint)
        self.executor = ThreadPoolExecutor(max(2, o.grad_accum), thread_name_prefix="teacher")
        self.teacher_latency = self.teacher_wait = 0.0

    # -- setup -------------------------------------------------------------------------
    def _resolve_resume(self, resume: str | None) -> Path | None:
        if resume is None:
            return None
        if resume == "auto":
            found = latest_checkpoint(self.out_dir)
            if found is None:
                log.info("no checkpoint in %s: starting from scratch", self.out_dir)
            return found
        return Path(resume)

    def _connect_teacher(self) -> Teacher | None:
        t = self.config.teacher
        if not self.config.uses_teacher and not (t.address or t.in_process):
            return None
        tls = dict(tls=t.tls, tls_ca=t.tls_ca, tls_cert=t.tls_cert, tls_key=t.tls_key)
        teacher = connect(t.address, t.in_process, timeout=t.timeout_s, **tls)
        try:
            if isinstance(teacher, TeacherClient):
                log.info("waiting for the teacher service at %s", t.address)
                try:
                    teacher.wait_until_serving(timeout=t.connect_timeout_s)
                except (TeacherServiceError, TimeoutError) as error:
                    raise ConfigError(
                        f"teacher.address: no teacher service serving at {t.address} within "
                        f"{t.connect_timeout_s:g} s (teacher.connect_timeout_s): {error}"
                    ) from None
            self._check_tokenizer(teacher)
        except ConfigError:
            teacher.close()
            raise
        return teacher

    def _check_tokenizer(self, teacher: Teacher) -> None:
        """Refuse a teacher whose vocabulary differs: its log-probs would mean other tokens."""
        try:
            info = teacher.check_tokenizer(self.tokenizer)
        except TokenizerMismatchError as error:
            key = "teacher.in_process" if self.config.teacher.in_process else "teacher.address"
            raise ConfigError(f"{key}: {error}") from None
        top_k = self.config.method.top_k
        if self.config.method.support == "topk" and top_k > info.vocab_size:
            raise ConfigError(
                f"method.top_k: {top_k} exceeds the teacher's vocabulary ({info.vocab_size} tokens)"
            )

    def _load(self, checkpoint: Path) -> None:
        state = load_state(checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # one sampling stream per rank of the saving world; ranks it did not have start fresh
        streams = state.get("rollout_generators", [state.get("rollout_generator")])
        if self.world.rank < len(streams) and streams[self.world.rank] is not None:
            self.rollout_generator.set_state(streams[self.world.rank])
        else:
            log.info("rank %d: a new sampling stream (the checkpoint had none)", self.world.rank)
        self.mixing.setstate(state["mixing"])
        self.stream.load_state_dict(state["data"])
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        if torch.cuda.is_available() and state.get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["cuda"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", checkpoint, self.step)

    def save(self) -> Path | None:
        """Every rank must call it (their sampling streams are gathered); rank 0 writes."""
        streams = self.world.gather(self.rollout_generator.get_state().cpu())
        if not self.world.is_main:
            return None
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rollout_generators": streams,
            "mixing": self.mixing.getstate(),
            "data": self.stream.state_dict(),
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "config": to_dict(self.config),
        }
        return save_checkpoint(
            self.out_dir,
            self.step,
            self.model,
            self.tokenizer,
            state,
            keep=self.config.run.keep_checkpoints,
        )

    # -- one step ------------------------------------------------------------------------
    def _completions(
        self, prompts: list[list[int]], examples: list[Example], on_policy: bool, micro: int
    ) -> list[list[int]]:
        m, r = self.config.method, self.config.rollout
        if on_policy:
            options = SamplingOptions(r.max_new_tokens, r.temperature, r.top_p)
            return sample_completions(
                self.model,
                prompts,
                options,
                vocab_size=self.vocab,
                eos_ids=self.eos_ids,
                pad_id=self.pad_id,
                generator=self.rollout_generator,
            )
        if m.name == "seqkd":
            seed = (self.config.run.seed * 1_000_003 + self.step) * 1_009 + micro
            outputs = self.teacher.generate(
                prompts, max_new_tokens=r.max_new_tokens, temperature=m.seqkd_temperature, seed=seed
            )
            return [o.token_ids for o in outputs]
        return [encode_answer(self.tokenizer, e.answer) for e in examples]

    def _student_candidates(self, batch: Batch) -> list[torch.Tensor]:
        """The student's own top-m ids at each completion position (for the union support)."""
        with torch.no_grad():
            logits = self._forward(batch)
        rows, _ = completion_rows(logits, batch)
        ids = rows.topk(self.config.method.student_candidates, dim=-1).indices.cpu()
        return list(ids.split(batch.loss_mask.sum(dim=1).tolist()))

    def _forward(self, batch: Batch, module: torch.nn.Module | None = None) -> torch.Tensor:
        out = (module or self.model)(
            input_ids=batch.input_ids.to(self.device),
            attention_mask=batch.attention_mask.to(self.device),
        )
        return out.logits[..., : self.vocab]

    def _score(self, batch: Batch, candidates: list[torch.Tensor] | None) -> tuple[Any, float]:
        m, started = self.config.method, time.perf_counter()
        results = self.teacher.score(
            batch.sequences,
            batch.prompt_lens,
            top_k=m.top_k if m.support == "topk" else 0,
            candidates=None if candidates is None else [c.numpy() for c in candidates],
            full=m.support == "full",
            temperature=m.temperature,
            dtype=self.config.teacher.dtype,
        )
        return results, time.perf_counter() - started

    def _prepare(self, on_policy: bool) -> list[MicroBatch]:
        """Build every micro-batch of the step; each goes to the teacher as soon as it exists."""
        m, o = self.config.method, self.config.optim
        distill = m.name == "gkd"
        micro_batches = []
        for index in range(o.grad_accum):
            examples = self.world.shard(self.stream.take(o.batch_size))
            group = m.samples_per_prompt if on_policy else 1
            examples = [e for e in examples for _ in range(group)]
            prompts = [encode_prompt(self.tokenizer, e.prompt) for e in examples]
            completions = self._completions(prompts, examples, on_policy, index)
            batch = build_batch(prompts, completions, eos_ids=self.eos_ids, pad_id=self.pad_id)
            item = MicroBatch(batch, examples)
            if distill and m.student_candidates > 0 and m.support == "topk":
                item.candidates = self._student_candidates(batch)
            if distill:
                call = partial(self._score, batch, item.candidates)
                local = getattr(self.teacher, "runs_in_process", False)
                item.scores = Deferred(call) if local else self.executor.submit(call)
            if m.alpha < 1.0:
                reward = REWARDS[m.reward]
                item.rewards = [
                    reward(self._decode(ids), e) for ids, e in zip(batch.completions, examples)
                ]
            micro_batches.append(item)
        return micro_batches

    def _decode(self, ids: list[int]) -> str:
        kept = [t for t in ids if t not in self.eos_ids]
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    def train_step(self) -> dict[str, Any]:
        m = self.config.method
        started = time.perf_counter()
        on_policy = m.name == "gkd" and self.mixing.random() < m.lmbda
        self.model.train()
        micro_batches = self._prepare(on_policy)
        # the whole world's completion tokens: every rank's loss is a share of one mean
        (total,) = self.world.sum([sum(mb.batch.num_tokens for mb in micro_batches)], self.device)
        total_tokens = int(total)
        loss_sum = divergence_sum = 0.0
        latency = wait = 0.0
        rewards: list[float] = []
        for index, mb in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # DDP all-reduces during the last micro-batch's backward only (it averages:
            # hence the world size factor, which turns the average back into the sum)
            accumulate = self.world.distributed and not last
            with self.trained.no_sync() if accumulate else contextlib.nullcontext():
                logits = self._forward(mb.batch, self.trained)
                rows, targets = completion_rows(logits, mb.batch)
                if mb.scores is None:  # sft / seqkd: next-token NLL on the given outputs
                    per_token = -token_logprobs(rows, targets)
                else:
                    waited = time.perf_counter()
                    results, seconds = mb.scores.result()
                    wait += time.perf_counter() - waited
                    latency += seconds
                    teacher = TeacherRows.from_results(results, mb.candidates).to(self.device)
                    per_token, div = divergence(rows, targets, teacher, m)
                    divergence_sum += float(div.sum())
                    if mb.rewards is not None:
                        advantages = group_advantages(mb.rewards, m.samples_per_prompt)
                        per_token = m.alpha * per_token + (1 - m.alpha) * reward_loss(
                            rows, targets, mb.batch, advantages.to(self.device)
                        )
                        rewards.extend(mb.rewards)
                mask = torch.ones_like(per_token, dtype=torch.bool)
                loss = token_level_loss(per_token, mask, total_tokens)
                (loss * self.world.size).backward()
            loss_sum += float(loss.detach())
        loss_sum, divergence_sum, reward_sum, reward_count = self.world.sum(
            [loss_sum, divergence_sum, sum(rewards), len(rewards)], self.device
        )
        o = self.config.optim
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), o.max_grad_norm if o.max_grad_norm > 0 else float("inf")
        )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - started
        record: dict[str, Any] = {
            "step": self.step,
            "loss": loss_sum,
            "on_policy": on_policy,
            "tokens": total_tokens,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "step_s": elapsed,
            "tokens_per_s": total_tokens / elapsed,
        }
        if m.name == "gkd":
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
        examples = getattr(self.splits, split)[: self.config.run.eval_size]
        was_training = self.model.training
        self.model.eval()
        try:
            return evaluate(
                self.model,
                self.tokenizer,
                self.teacher,
                examples,
                self.config,
                eos_ids=self.eos_ids,
                pad_id=self.pad_id,
            )
        finally:
            self.model.train(was_training)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        if self.teacher is not None:
            self.teacher.close()
        destroy_process_group(self.world)


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
    """
    trainer = Trainer(config, resume=resume, teacher=teacher)
    run, total, main = config.run, config.optim.steps, trainer.world.is_main
    metrics = MetricsLog(trainer.out_dir, trainer.step) if main else None
    if main:
        (trainer.out_dir / "config.yaml").write_text(json.dumps(to_dict(config), indent=2))
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
    finally:
        if metrics is not None:
            metrics.close()
        trainer.close()
    return result


def evaluate_split(
    config: TrainConfig,
    split: str = "test",
    *,
    checkpoint: str | Path | None = None,
    size: int | None = None,
) -> dict[str, float]:
    """The task metrics on the first `size` prompts of a split (default: all of it), and
    divergences when config names a teacher, for student.model or a run's checkpoint."""
    config = copy.deepcopy(config)
    sizes = {"validation": config.task.validation_size, "test": config.task.test_size}
    config.run.eval_size = sizes[split] if size is None else size
    trainer = Trainer(config, resume=None if checkpoint is None else str(checkpoint))
    try:
        return trainer.evaluate(split)
    finally:
        trainer.close()


def _prefixed(values: dict[str, float]) -> dict[str, float]:
    return {f"eval/{k}": v for k, v in values.items()}


def _describe(evaluation: dict[str, Any]) -> str:
    parts = [f"{k.removeprefix('eval/')} {v:.4f}" for k, v in evaluation.items() if k != "step"]
    return f"eval @ step {evaluation['step']}: " + ", ".join(parts)
