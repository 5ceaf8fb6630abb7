"""Everything a run carries from step to step besides the weights, and its checkpoints.

A resumed run must compute exactly the steps the uninterrupted run would have, so all
that moves or draws lives here: the step, AdamW's moments (of the trainable parameters
only: with LoRA, the adapters'), the schedule, fp16's loss scale, each rank's sampling
stream, Algorithm 1's coin, the data position and the global torch / Python /
numpy / CUDA generators. checkpoint.py writes and finds the files; this decides what
goes in them (the keys of trainer_state.pt stay as they are, so old checkpoints load).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from student_trainer.checkpoint import load_state, save_checkpoint
from student_trainer.config import OptimConfig, TrainConfig, to_dict
from student_trainer.data import ExampleStream
from student_trainer.distributed import World
from student_trainer.lora import trainable_parameters
from student_trainer.precision import Precision

log = logging.getLogger(__name__)
# rank r samples with its own stream, seeded run.seed + r * RANK_SEED_STRIDE (rank 0: run.seed)
RANK_SEED_STRIDE = 1_000_003


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


def _global_generators() -> dict[str, Any]:
    """torch's, Python's, numpy's and CUDA's global generators, as a checkpoint keeps them."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_global_generators(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if torch.cuda.is_available() and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class Draws:
    """Where every stream a step draws from stands (RunState.draws), to rewind a step that
    failed: its draws then never happened, as far as a checkpoint can tell."""

    mixing: Any
    data: dict[str, int]
    rollout_generator: torch.Tensor
    generators: dict[str, Any]


@dataclass
class RunState:
    step: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rollout_generator: torch.Generator  # this rank's sampling stream
    mixing: random.Random  # Algorithm 1's coin: one draw per step
    stream: ExampleStream  # the training examples, in their seeded order
    # this rank's steps built ahead of training (rollout_queue.py), as a checkpoint keeps them
    pending_rollouts: list[dict[str, Any]] = field(default_factory=list)
    precision: Precision = field(default_factory=Precision)  # autocast and fp16's scaler

    @classmethod
    def start(
        cls,
        optim: OptimConfig,
        model: torch.nn.Module,
        stream: ExampleStream,
        world: World,
        device: torch.device,
        *,
        seed: int,
        autocast: str,
    ) -> RunState:
        """Step 0 of a run, from the optim section, run.seed and student.autocast. The global
        generators are seeded here: torch's, which dropout draws from, and Python's and
        numpy's, which nothing draws from but a checkpoint keeps, so that two runs of one
        config and seed write the same checkpoints, byte for byte."""
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        optimizer = torch.optim.AdamW(
            trainable_parameters(model), lr=optim.lr, weight_decay=optim.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, optim.warmup_steps, optim.steps, optim.schedule)
        )
        generator = torch.Generator(device=device).manual_seed(seed + RANK_SEED_STRIDE * world.rank)
        precision = Precision.create(autocast, device)
        mixing = random.Random(seed)
        return cls(0, optimizer, scheduler, generator, mixing, stream, precision=precision)

    def save(
        self,
        out_dir: Path,
        model: torch.nn.Module,
        tokenizer: Any,
        config: TrainConfig,
        world: World,
    ) -> Path | None:
        """Every rank must call it (their sampling streams are gathered); rank 0 writes."""
        streams = world.gather(self.rollout_generator.get_state().cpu())
        pending = world.gather(self.pending_rollouts)
        if not world.is_main:
            return None
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rollout_generators": streams,
            "mixing": self.mixing.getstate(),
            "data": self.stream.state_dict(),
            "pending_rollouts": pending,
            **_global_generators(),  # torch, python, numpy, cuda
            "config": to_dict(config),
        }
        scaler = self.precision.state_dict()
        if scaler is not None:  # fp16 autocast's loss scale (other runs' files keep their keys)
            state["grad_scaler"] = scaler
        keep = config.run.keep_checkpoints
        return save_checkpoint(out_dir, self.step, model, tokenizer, state, keep=keep)

    def load(self, checkpoint: Path, world: World) -> None:
        """Continue from a checkpoint (the weights come with the model, from its directory)."""
        state = load_state(checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # one sampling stream per rank of the saving world; ranks it did not have start fresh
        streams = state.get("rollout_generators", [state.get("rollout_generator")])
        if world.rank < len(streams) and streams[world.rank] is not None:
            self.rollout_generator.set_state(streams[world.rank])
        else:
            log.info("rank %d: a new sampling stream (the checkpoint had none)", world.rank)
        self.mixing.setstate(state["mixing"])
        pending = state.get("pending_rollouts", [])  # per rank; a rank it lacks builds afresh
        self.pending_rollouts = pending[world.rank] if world.rank < len(pending) else []
        self.stream.load_state_dict(state["data"])
        self.precision.load_state_dict(state.get("grad_scaler"))
        _set_global_generators(state)
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", checkpoint, self.step)

    def draws(self) -> Draws:
        """Where the step's random streams and the data position stand now."""
        return Draws(
            self.mixing.getstate(),
            self.stream.state_dict(),
            self.rollout_generator.get_state(),
            _global_generators(),
        )

    def rewind(self, draws: Draws) -> None:
        """Put every stream back where `draws` found it (a failed step's draws undone)."""
        self.mixing.setstate(draws.mixing)
        self.stream.load_state_dict(draws.data)
        self.rollout_generator.set_state(draws.rollout_generator)
        _set_global_generators(draws.generators)
