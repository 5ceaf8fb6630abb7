"""The failure protocol on its own (a world of one, a linear model, a queue of empty
rollouts): a step whose teacher fails leaves no trace, and the error names the teacher
section. tests/test_shutdown.py runs it inside whole runs that then resume exactly."""

from __future__ import annotations

import grpc
import pytest
import torch

from student_trainer.config import OptimConfig, TeacherConfig
from student_trainer.data import ExampleStream
from student_trainer.distributed import World
from student_trainer.rollout_queue import Rollout, RolloutQueue
from student_trainer.run_state import Draws, RunState
from student_trainer.step_guard import StepGuard
from student_trainer.tasks import Example
from student_trainer.teacher import ScoreFuture, TeacherOutage
from teacher_client import TeacherServiceError

CPU = torch.device("cpu")
TEACHER = TeacherConfig(address="teacher.example:50051", timeout_s=5)


def unavailable(method: str) -> TeacherServiceError:
    return TeacherServiceError(method, grpc.StatusCode.UNAVAILABLE, "failed to connect")


class OtherRank(World):
    """A world of this rank and another, whose teacher calls fail once `fails` is set: the
    guard's flag, the last value of each sum, then comes back raised."""

    fails = False

    def sum(self, values, device):
        return [*values[:-1], values[-1] + self.fails]


def run_parts(
    failing_build: int | None = None, world: World | None = None
) -> tuple[RunState, RolloutQueue, StepGuard]:
    """A run state and a queue whose every build draws from each stream; building step
    `failing_build` fails as SeqKD's teacher.generate does in an outage."""
    world = world or World()
    examples = [Example(f"{n}+1=", str(n + 1)) for n in range(8)]
    with torch.random.fork_rng():
        state = RunState.start(
            OptimConfig(),
            torch.nn.Linear(2, 1),
            ExampleStream(examples, seed=0),
            World(),
            CPU,
            seed=0,
            autocast="none",
        )

    def build_step(step: int, version: int) -> Rollout:
        state.mixing.random()
        state.stream.take(2)
        torch.rand(1, generator=state.rollout_generator)
        torch.rand(1)
        if step == failing_build:
            raise unavailable("Generate")
        return Rollout(step, version, False, [])

    queue = RolloutQueue(None, build_step, staleness=1)  # step t builds t + 1 as well
    return state, queue, StepGuard(TEACHER, state, queue, world, CPU)


def same_draws(a: Draws, b: Draws) -> bool:
    return (
        a.mixing == b.mixing
        and a.data == b.data
        and torch.equal(a.rollout_generator, b.rollout_generator)
        and torch.equal(a.generators["torch"], b.generators["torch"])
    )


def test_a_build_that_meets_an_outage_leaves_the_streams_and_the_queue_as_they_were():
    state, queue, guard = run_parts(failing_build=1)
    with torch.random.fork_rng():
        before = state.draws()
        with pytest.raises(TeacherOutage) as caught:
            guard.take(0)  # builds step 0, then step 1's build fails
        assert same_draws(state.draws(), before)
    assert queue.pending() == []  # step 0's rollout, built by the failed take, is gone
    assert caught.value.address == TEACHER.address and caught.value.timeout_s == 5
    assert "Generate failed with UNAVAILABLE" in str(caught.value)


def test_another_ranks_failed_build_undoes_this_ranks_take_but_keeps_a_step_built_before():
    world = OtherRank()
    state, queue, guard = run_parts(world=world)
    guard.take(0)  # step 0, and step 1 built ahead
    world.fails = True
    with torch.random.fork_rng():
        before = state.draws()
        with pytest.raises(TeacherOutage, match="another rank's teacher call failed"):
            guard.take(1)  # this rank built step 2 without a fault
        assert same_draws(state.draws(), before)
    assert [r["step"] for r in queue.pending()] == [1]  # step 2 dropped, step 1 pending


def test_a_step_whose_score_fails_gives_back_its_rollout_gradients_and_draws():
    state, queue, guard = run_parts()
    weight = state.optimizer.param_groups[0]["params"][0]
    with torch.random.fork_rng():
        rollout, tokens = guard.take(0)
        built = state.draws()
        assert tokens == 0 and not guard.failed
        weight.grad = torch.ones_like(weight)  # a backward before the failure
        failing = ScoreFuture()
        failing.latency_s = 2.5
        failing.set_exception(unavailable("Score"))
        assert guard.scores(failing) is None and guard.failed
        torch.rand(1)  # the remaining forwards' dropout
        with pytest.raises(TeacherOutage) as caught:
            guard.settle(rollout, [1.0, 2.0])
        assert same_draws(state.draws(), built)
    assert weight.grad is None
    assert [r["step"] for r in queue.pending()] == [0, 1]  # the step is pending again
    assert caught.value.waited_s == 2.5 and "Score failed with UNAVAILABLE" in str(caught.value)


def test_a_step_the_teacher_answers_passes_its_sums_through_and_a_refusal_is_not_an_outage():
    *_, guard = run_parts()
    rollout, _ = guard.take(0)
    answered = ScoreFuture()
    answered.set_result(["scores"])
    assert guard.scores(answered) == ["scores"]
    assert guard.settle(rollout, [1.5, 3.0]) == [1.5, 3.0]
    refused = ScoreFuture()
    refused.set_exception(
        TeacherServiceError("Score", grpc.StatusCode.INVALID_ARGUMENT, "top_k too large")
    )
    with pytest.raises(TeacherServiceError, match="INVALID_ARGUMENT"):
        guard.scores(refused)  # a refusal is a bug to show, not an outage to wait out
