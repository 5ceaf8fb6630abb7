"""Mixed precision for the training forward (`student.autocast`: none | bf16 | fp16).

Under autocast the student's forward and the loss run their matrix products in 16 bits
while the weights, their gradients and AdamW's moments stay in `student.dtype` (float32):
activations take half the memory and tensor cores do the products. The backward runs
outside autocast, as torch recommends (it follows the forward's dtypes by itself), and the
chunked loss's recomputation restores the autocast state it ran under (rows.py).

fp16 needs a GradScaler: small gradients underflow in float16, so the loss is scaled up
before the backward and the gradients down before clipping; a step whose gradients hold an
inf or nan is skipped and the scale lowered. The scaler's state is carried in checkpoints
so a resumed run scales as the uninterrupted one would. fp16 runs on CUDA only (refused on
CPU: config.py). bf16 has float32's range and needs no scaler; on CPU it runs too (torch's
CPU autocast), which is how it is tested, though it is rarely faster there.

Sampling, the student's candidate forwards and evaluation run without autocast: no
gradients there, so no activations kept, and samples are drawn from float32 logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from student_trainer.config import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """How train_step runs its forward, backward and optimizer step."""

    device_type: str = "cpu"
    dtype: torch.dtype | None = None  # None: no autocast
    scaler: torch.amp.GradScaler | None = None  # fp16 only

    @classmethod
    def create(cls, autocast: str, device: torch.device) -> Precision:
        """student.autocast on `device` (after `auto` resolved it)."""
        if autocast == "none":
            return cls(device.type)
        if autocast == "fp16" and device.type != "cuda":
            raise ConfigError(
                f"student.autocast: fp16 autocast needs CUDA, the student is on {device}: "
                "use bf16 or none"
            )
        scaler = torch.amp.GradScaler(device.type) if autocast == "fp16" else None
        return cls(device.type, DTYPES[autocast], scaler)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Around the forward and the loss (not the backward)."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """The true gradients, before they are clipped."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(), skipped by the scaler when fp16 gradients overflowed."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
