"""The student at its completion positions, before the output layer, and the loss over them
computed a chunk of rows at a time.

The loss reads the student's logits only at the positions that predict completion tokens,
and at a 152k vocabulary even those are large: 8 x 1,024 rows of float32 logits are 5 GB,
their gradient as much again, and log_softmax and the divergence add a few more of that
size. So the student's forward stops at the hidden states [N, H] of those rows
(student.py), and whatever the loss needs per row is computed `chunk_rows` rows at a time:
output layer, log_softmax and divergence of one chunk, under activation checkpointing, so
that the backward recomputes a chunk's logits instead of keeping every chunk's. Peak memory
is O(chunk_rows x V), not O(N x V); values and gradients are those of the whole computation
(to float rounding), for the price of a second output-layer forward in the backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# [n, vocab] logits and the same n rows of each per-row input -> [n, ...], or a tuple of them
RowFunction = Callable[..., Tensor | tuple[Tensor, ...]]


@dataclass
class StudentRows:
    """The student's states at the N completion positions (objective.completion_rows' rows,
    in its order), and how they become logits."""

    states: Tensor  # [N, D]: hidden states (D = H), or logits already (D = padded V)
    project: Callable[[Tensor], Tensor] | None  # [n, H] -> [n, padded V]; None: states are logits
    vocab: int  # the tokenizer's size: padded output rows past it are cut
    chunk_rows: int = 0  # rows whose logits exist at once; 0: all N

    def map(self, fn: RowFunction, *per_row: Tensor | None) -> Tensor | tuple[Tensor, ...]:
        """fn(logits [n, vocab], *the same n rows of each `per_row` tensor [N, ...]) for every
        chunk of rows, concatenated: [N, ...] (a tuple of them when fn returns a tuple). A
        `per_row` None is passed as None.

        With gradients and more than one chunk, each chunk is checkpointed: its logits and
        everything fn derives from them are freed after its forward and recomputed in the
        backward, one chunk at a time. One chunk gains nothing from that (the recomputed
        chunk is as large as the kept one), so it runs plainly."""
        size = self.chunk_rows or max(1, self.states.shape[0])
        states = self.states.split(size)
        inputs = [[None] * len(states) if t is None else t.split(size) for t in per_row]
        recompute = len(states) > 1 and torch.is_grad_enabled()
        outputs = []
        for chunk, *rows in zip(states, *inputs, strict=True):
            if recompute:
                outputs.append(checkpoint(self._apply, fn, chunk, *rows, use_reentrant=False))
            else:
                outputs.append(self._apply(fn, chunk, *rows))
        if isinstance(outputs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))
        return torch.cat(outputs)

    def _apply(
        self, fn: RowFunction, states: Tensor, *rows: Tensor | None
    ) -> Tensor | tuple[Tensor, ...]:
        logits = states if self.project is None else self.project(states)
        return fn(logits[..., : self.vocab], *rows)
