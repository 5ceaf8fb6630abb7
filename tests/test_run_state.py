"""A run's state at step 0, made of the sections it reads (optim, run.seed,
student.autocast) and no whole run config."""

from __future__ import annotations

import random

import pytest
import torch

from student_trainer.config import OptimConfig
from student_trainer.data import ExampleStream
from student_trainer.distributed import World
from student_trainer.run_state import RANK_SEED_STRIDE, RunState
from student_trainer.tasks import Example


def test_a_run_starts_from_its_optim_section_and_run_seed_alone():
    optim = OptimConfig(lr=0.5, weight_decay=0.1, warmup_steps=2, steps=10, schedule="linear")
    stream = ExampleStream([Example("1+1=", "2")], seed=0)
    with torch.random.fork_rng():
        state = RunState.start(
            optim,
            torch.nn.Linear(3, 2),
            stream,
            World(rank=1, size=2),
            torch.device("cpu"),
            seed=7,
            autocast="none",
        )
        assert torch.initial_seed() == 7  # torch's global generator, as a fresh run's
    (group,) = state.optimizer.param_groups
    assert group["weight_decay"] == 0.1
    assert group["lr"] == pytest.approx(0.5 * 1 / 3)  # the warmup's first of 2 steps
    for _ in range(optim.steps):
        state.optimizer.step()  # no gradients: the weights stay
        state.scheduler.step()
    assert state.scheduler.get_last_lr() == [0.0]  # linear decay to 0 at optim.steps
    assert state.mixing.random() == random.Random(7).random()  # Algorithm 1's coin
    rank_1 = torch.Generator().manual_seed(7 + RANK_SEED_STRIDE)  # rank 1's own stream
    assert torch.equal(state.rollout_generator.get_state(), rank_1.get_state())
