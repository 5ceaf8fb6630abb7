"""Steps built ahead: step t + k's samples drawn, and scored by the teacher, while step t trains.

`rollout.max_staleness` = k. With k = 0 every step builds its own micro-batches from the
weights it trains (exactly on-policy, as the GKD paper does). With k > 0 one worker thread
builds them ahead, in step order: step s from a copy of the weights taken when step
max(0, s - k) starts, so sampling overlaps that step's training and the teacher's scoring
overlaps it too (verl's and TRL's asynchronous rollouts, with the staleness bounded).

Everything the building draws (Algorithm 1's coin, the data stream, the sampling stream)
is drawn by that one thread in step order, so which step gets which samples does not depend
on timing: a run with k > 0 is as reproducible as a synchronous one. A checkpoint waits for
the steps built ahead and stores their sequences; a resumed run trains those same sequences
(the teacher scores them again) and builds on from the stored streams, exactly as the
uninterrupted run does.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch

from student_trainer.microbatch import MicroBatch, MicroBatchBuilder, submit_scores
from student_trainer.rollouts import build_batch
from student_trainer.tasks import Example


@dataclass
class Rollout:
    """One optimizer step's micro-batches, and the weights that sampled them."""

    step: int
    version: int  # optimizer steps the sampling weights had taken (== step when in sync)
    on_policy: bool
    micro_batches: list[MicroBatch]

    @property
    def staleness(self) -> int:
        return self.step - self.version

    def to_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of a step built ahead: its sequences, not the teacher's
        scores (they are asked again on resume; the teacher answers the same)."""
        return {
            "step": self.step,
            "version": self.version,
            "on_policy": self.on_policy,
            "micro_batches": [
                {
                    "sequences": mb.batch.sequences,
                    "prompt_lens": mb.batch.prompt_lens,
                    "examples": [(e.prompt, e.answer) for e in mb.examples],
                    "candidates": mb.candidates,
                    "rewards": mb.rewards,
                }
                for mb in self.micro_batches
            ],
        }


BuildStep = Callable[[int, int, MicroBatchBuilder], Rollout]  # (step, version, builder)


class RolloutQueue:
    """Hands each step its Rollout; with k > 0 builds steps up to t + k when step t starts."""

    def __init__(self, builder: MicroBatchBuilder, build_step: BuildStep, staleness: int) -> None:
        self.builder = builder
        self.build_step = build_step
        self.staleness = staleness
        self._ahead: dict[int, Future[Rollout]] = {}
        self._next = 0  # the first step not built or being built
        self._worker: ThreadPoolExecutor | None = None
        self._sampler: torch.nn.Module | None = None
        self._stream: torch.cuda.Stream | None = None  # the worker's own, on CUDA
        if staleness > 0:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts")
            self._sampler = copy.deepcopy(builder.student.model).eval().requires_grad_(False)
            device = builder.student.device
            if device.type == "cuda":
                self._stream = torch.cuda.Stream(device)

    def take(self, step: int) -> Rollout:
        """Step `step`'s micro-batches; call it when the step starts (weights at `step`)."""
        if self._worker is None:
            return self.build_step(step, step, self.builder)
        self._next = max(self._next, step)
        while self._next <= step + self.staleness:
            self._ahead[self._next] = self._worker.submit(
                self._build_from, self._next, step, *self._snapshot()
            )
            self._next += 1
        return self._ahead.pop(step).result()

    def _snapshot(self) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """A copy of the trained weights as they are now, and on CUDA the event after which
        the copy is complete (the worker's stream waits for it, not for later training)."""
        with torch.no_grad():
            weights = {
                k: v.detach().clone() for k, v in self.builder.student.model.state_dict().items()
            }
        if self._stream is None:
            return weights, None
        copied = torch.cuda.Event()
        copied.record()
        return weights, copied

    def _build_from(
        self,
        step: int,
        version: int,
        weights: dict[str, torch.Tensor],
        copied: torch.cuda.Event | None,
    ) -> Rollout:
        """On the worker thread: load the snapshot into the sampling copy, build the step."""
        assert self._sampler is not None
        side = self._stream
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if side is not None and copied is not None:
                side.wait_event(copied)
            self._sampler.load_state_dict(weights)
            student = replace(self.builder.student, model=self._sampler)
            rollout = self.build_step(step, version, replace(self.builder, student=student))
            if side is not None:
                side.synchronize()  # its samples and snapshot are done before anyone reuses them
        return rollout

    def pending(self) -> list[dict[str, Any]]:
        """The steps built ahead, for a checkpoint; waits for the worker to finish them, so the
        streams it draws from are saved as they are after them."""
        return [self._ahead[s].result().to_state() for s in sorted(self._ahead)]

    def restore(self, states: list[dict[str, Any]]) -> None:
        """Steps a checkpoint had built ahead: the same sequences, sent to the teacher again."""
        for state in states:
            rollout = Rollout(
                state["step"],
                state["version"],
                state["on_policy"],
                [self._micro_batch(saved) for saved in state["micro_batches"]],
            )
            done: Future[Rollout] = Future()
            done.set_result(rollout)
            self._ahead[rollout.step] = done
            self._next = max(self._next, rollout.step + 1)

    def _micro_batch(self, saved: dict[str, Any]) -> MicroBatch:
        student, config = self.builder.student, self.builder.config
        sequences, lens = saved["sequences"], saved["prompt_lens"]
        batch = build_batch(
            [s[:n] for s, n in zip(sequences, lens)],
            [s[n:] for s, n in zip(sequences, lens)],
            eos_ids=student.eos_ids,
            pad_id=student.pad_id,
        )
        item = MicroBatch(
            batch,
            [Example(prompt, answer) for prompt, answer in saved["examples"]],
            saved["candidates"],
            rewards=saved["rewards"],
        )
        if config.method.name == "gkd":
            item.scores = submit_scores(self.builder.teacher, batch, item.candidates, config)
        return item

    def close(self) -> None:
        """Waits for a step being built (it may be using the teacher), drops the rest."""
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)
