"""torchrun's process group, seen by the trainer as one small object.

`torchrun --nproc_per_node N -m student_trainer train ...` sets RANK, WORLD_SIZE and
LOCAL_RANK; without them the trainer is a world of one and every method here is a no-op,
so the single-process path is exactly the code that ran before.

The division of work (GKD needs nothing more than data parallelism):
- every rank draws the same global micro-batch from the same seeded stream and keeps its
  contiguous shard, so the data position is one number for the whole world and a
  checkpoint resumes at any world size;
- gradients are all-reduced by DistributedDataParallel; the loss is normalised by the
  whole world's completion-token count, so N ranks compute the 1-rank step exactly;
- each rank samples its own completions (its own seeded stream) and calls the teacher
  pool itself; rank 0 alone evaluates, logs and writes checkpoints.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)
T = TypeVar("T")
# gloo and nccl give up on a collective after this long; rank 0's evaluations keep the
# others waiting at the next all-reduce, and a large eval split can take a while
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of a global batch (sizes differ by at most one)."""
        if len(items) < self.size:
            raise ValueError(
                f"optim.batch_size: {len(items)} prompts cannot be shared by {self.size} "
                "ranks (the batch size is global: use at least one prompt per rank)"
            )
        base, extra = divmod(len(items), self.size)
        start = self.rank * base + min(self.rank, extra)
        return list(items[start : start + base + (self.rank < extra)])

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (float64, so the totals are exact for counts)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def from_environment() -> World:
    """The world torchrun describes in the environment (a world of one without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def device_for(world: World, device: torch.device) -> torch.device:
    """One GPU per local rank: `cuda` becomes `cuda:LOCAL_RANK` under torchrun."""
    if world.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", world.local_rank)
    return device


def data_parallel(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """The module that computes gradients: under torchrun a DDP wrapper, which all-reduces
    them during backward; alone the model itself."""
    if not world.distributed:
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def init_process_group(world: World, device: torch.device) -> None:
    """gloo on CPU, nccl on CUDA; a no-op for a world of one or an existing group."""
    if not world.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    log.info("rank %d of %d: %s process group on %s", world.rank, world.size, backend, device)


def destroy_process_group(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
