"""Steps built ahead: step t + k's samples drawn when step t starts, so the teacher scores
them while step t (and the k - 1 after it) train.

`rollout.max_staleness` = k. With k = 0 every step builds its own micro-batches from the
weights it trains (exactly on-policy, as the GKD paper does). With k > 0, when step t
starts, the steps up to t + k are built from the weights as they are then (step t's): the
student samples and the micro-batches go to the teacher, whose answers are needed only k
steps later. The teacher's latency hides behind k whole steps of training (verl's and
TRL's asynchronous rollouts, with the staleness bounded) instead of behind the step's own
forward passes.

The building runs on the trainer's thread, before the step trains. A worker thread that
sampled while the step trained was measured first (bench/bench_trainer.py, 2 CPU cores):
sampling and training then share the student's device, the sampled step reaches the
teacher only when time-slicing lets its sampling finish, and on CPU torch used from a
second thread oversubscribes the cores. The thread cost more than it hid (docs/benchmarks.md).

Everything the building draws (Algorithm 1's coin, the data stream, the sampling stream)
is drawn in step order, so a run with k > 0 is as reproducible as one with 0. A checkpoint
stores the sequences of the steps built ahead; a resumed run trains those same sequences
(the teacher scores them again) and builds on from the stored streams, exactly as the
uninterrupted run does.

A step whose teacher fails (an outage past teacher.timeout_s: step_guard.py) is given
back: `put_back` makes its rollout pending again, so the checkpoint written then keeps its
sequences and the resumed run trains them, with k = 0 too. A build that fails (SeqKD's
teacher.generate) leaves the queue as it found it (`take` drops what it built; the step
guard rewinds the streams it drew from).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
                    "examples": [(e.prompt, e.answer, e.templated) for e in mb.examples],
                    "candidates": mb.candidates,
                    "rewards": mb.rewards,
                }
                for mb in self.micro_batches
            ],
        }


BuildStep = Callable[[int, int], Rollout]  # (step, version of the weights that sample it)


class RolloutQueue:
    """Hands each step its Rollout; with k > 0 builds steps up to t + k when step t starts."""

    def __init__(self, builder: MicroBatchBuilder, build_step: BuildStep, staleness: int) -> None:
        self.builder = builder
        self.build_step = build_step
        self.staleness = staleness
        self._ahead: dict[int, Rollout] = {}
        self._next = 0  # the first step not built yet
        self._taken_from = 0  # _next before the last take: the steps it built start here

    def take(self, step: int) -> Rollout:
        """Step `step`'s micro-batches; call it when the step starts (weights at `step`).
        If building raises, the steps this call built are dropped again."""
        self._next = self._taken_from = max(self._next, step)
        try:
            while self._next <= step + self.staleness:
                self._ahead[self._next] = self.build_step(self._next, step)
                self._next += 1
        except BaseException:
            self._drop_built()
            raise
        return self._ahead.pop(step)

    def put_back(self, rollout: Rollout) -> None:
        """A taken step that did not train (its teacher failed): pending again, with the
        steps built since, as a checkpoint then keeps them. Its scores are not asked again:
        the trainer stops, and the run resumes from that checkpoint."""
        self._ahead[rollout.step] = rollout

    def undo_take(self, rollout: Rollout) -> None:
        """Undo the last take (another rank's build failed): the steps it built are dropped
        (the caller rewinds the streams they drew) and `rollout`, if built before, is
        pending again."""
        self._drop_built()
        if rollout.step < self._taken_from:
            self.put_back(rollout)

    def _drop_built(self) -> None:
        for step in range(self._taken_from, self._next):
            self._ahead.pop(step, None)
        self._next = self._taken_from

    def pending(self) -> list[dict[str, Any]]:
        """The steps built ahead, for a checkpoint (the streams are saved as they are after
        them)."""
        return [self._ahead[s].to_state() for s in sorted(self._ahead)]

    def restore(self, states: list[dict[str, Any]]) -> None:
        """Steps a checkpoint had built ahead: the same sequences, sent to the teacher again."""
        for state in states:
            rollout = Rollout(
                state["step"],
                state["version"],
                state["on_policy"],
                [self._micro_batch(saved) for saved in state["micro_batches"]],
            )
            self._ahead[rollout.step] = rollout
            self._next = max(self._next, rollout.step + 1)

    def _micro_batch(self, saved: dict[str, Any]) -> MicroBatch:
        builder, student = self.builder, self.builder.student
        sequences, lens = saved["sequences"], saved["prompt_lens"]
        batch = build_batch(
            [s[:n] for s, n in zip(sequences, lens)],
            [s[n:] for s, n in zip(sequences, lens)],
            eos_ids=student.eos_ids,
            pad_id=student.pad_id,
        )
        item = MicroBatch(
            batch,
            [Example(*fields) for fields in saved["examples"]],  # older: (prompt, answer)
            saved["candidates"],
            rewards=saved["rewards"],
        )
        if builder.method.name == "gkd":
            item.scores = submit_scores(
                builder.teacher, batch, item.candidates, builder.score_options
            )
        return item
