"""A step whose teacher fails is taken on no rank: the failure protocol beside the loop.

train.py's `train_step` is Algorithm 1 (take the step's rollout, ask the teacher, take the
loss, step); this is what happens when the teacher stays out of reach past
teacher.timeout_s (`teacher.is_outage`). The step must then leave no trace, so that the
checkpoint train() writes resumes exactly: no optimizer or schedule step, the step
counter and every stream a checkpoint keeps as the step found them (`RunState.draws`,
`RunState.rewind`), and the step's rollout pending again (`RolloutQueue.put_back`; or
`undo_take`, when building it failed).

Under torchrun every rank must learn of any rank's outage, or the others would wait in a
collective for a rank that has gone. The guard adds one flag to two sums the step makes
anyway: the completion-token count once the rollout is built (a failed build: SeqKD's
teacher.generate), and the step's closing sums after the backward passes (a failed
score). A rank whose score failed runs its remaining micro-batches with a zero loss (the
loop's part: DDP all-reduces during the last backward), so every rank reaches the closing
sum, and they all raise TeacherOutage together and can all write the checkpoint.
"""

from __future__ import annotations

import torch

from student_trainer.config import TeacherConfig
from student_trainer.distributed import World
from student_trainer.rollout_queue import Rollout, RolloutQueue
from student_trainer.run_state import Draws, RunState
from student_trainer.teacher import ScoreFuture, TeacherOutage, is_outage
from teacher_client import ScoreResult, TeacherServiceError


class StepGuard:
    """One run's failure protocol. Each step calls `take` once, `scores` for each
    micro-batch's teacher signal, and `settle` once its backward passes are done; any of
    them raises TeacherOutage, on every rank, with the step undone."""

    def __init__(
        self,
        config: TeacherConfig,
        state: RunState,
        rollouts: RolloutQueue,
        world: World,
        device: torch.device,
    ) -> None:
        self.config = config  # the teacher section: what TeacherOutage names
        self.state, self.rollouts, self.world, self.device = state, rollouts, world, device
        self.outage: TeacherOutage | None = None  # this rank's, in the step under way
        self._built: Draws | None = None  # where the streams stood once the step was built

    @property
    def failed(self) -> bool:
        """Whether this rank's teacher failed in the step under way (nothing will be
        stepped: its remaining micro-batches only keep DDP's collectives in step)."""
        return self.outage is not None

    def take(self, step: int) -> tuple[Rollout, int]:
        """Step `step`'s rollout (RolloutQueue.take) and the whole world's count of its
        completion tokens. If any rank's build met an outage, the queue and the streams are
        put back as the step found them and every rank raises TeacherOutage."""
        before = self.state.draws()
        self.outage = None
        rollout: Rollout | None = None
        try:
            rollout = self.rollouts.take(step)
        except TeacherServiceError as error:  # SeqKD's teacher.generate
            if not is_outage(error):
                raise
            self.outage = TeacherOutage(self.config, str(error))
        tokens = sum(mb.batch.num_tokens for mb in rollout.micro_batches) if rollout else 0
        total, build_failed = self.world.sum([tokens, self.failed], self.device)
        if build_failed:
            if rollout is not None:
                self.rollouts.undo_take(rollout)
            self.state.rewind(before)
            raise self._outage()
        assert rollout is not None
        self._built = self.state.draws()  # the forwards may draw (dropout): rewound too
        return rollout, int(total)

    def scores(self, future: ScoreFuture) -> list[ScoreResult] | None:
        """The teacher's scores, waited for; None if the call failed with an outage (this
        rank's step has failed: `failed`)."""
        try:
            return future.result()
        except TeacherServiceError as error:
            if not is_outage(error):
                raise
            self.outage = TeacherOutage(self.config, str(error), future.latency_s)
            return None

    def settle(self, rollout: Rollout, sums: list[float]) -> list[float]:
        """The whole world's `sums`, summed together with whether any rank's teacher failed
        in this step. If one did, the gradients go, `rollout` is pending again (the run
        resumes with it), the streams go back to where its building left them, and every
        rank raises TeacherOutage."""
        *totals, score_failed = self.world.sum([*sums, self.failed], self.device)
        if score_failed:
            self.state.optimizer.zero_grad(set_to_none=True)
            self.rollouts.put_back(rollout)
            assert self._built is not None
            self.state.rewind(self._built)
            raise self._outage()
        return totals

    def _outage(self) -> TeacherOutage:
        """This rank's outage, or one that says another rank met it."""
        return self.outage or TeacherOutage(self.config, "another rank's teacher call failed")
