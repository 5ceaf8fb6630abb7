"""The configured task's examples, as token ids and back, and a seeded, resumable stream
of training examples."""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import Any

from student_trainer.config import TaskConfig
from student_trainer.tasks import TASKS, Example, Splits


def task_splits(task: TaskConfig) -> Splits:
    """The task's train / validation / test examples (task.seed decides them)."""
    return TASKS[task.name].splits(task.train_size, task.validation_size, task.test_size, task.seed)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """The prompt as the model sees it, with the tokenizer's special tokens (e.g. <bos>)."""
    return list(tokenizer(text)["input_ids"])


def encode_answer(tokenizer: Any, text: str) -> list[int]:
    """The reference completion: its tokens then eos, so stopping is learned too."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [*ids, tokenizer.eos_token_id]


def decode_completion(tokenizer: Any, ids: list[int], eos_ids: Collection[int]) -> str:
    """A completion's text, without its eos (what the task's metrics and rewards read)."""
    return tokenizer.decode([t for t in ids if t not in eos_ids], skip_special_tokens=True)


class ExampleStream:
    """Endless passes over a dataset, each pass in a fresh seeded order.

    The position (epoch, offset) is the whole state: a checkpoint stores it and a resumed
    run draws exactly the examples the uninterrupted run would have drawn.
    """

    def __init__(self, examples: list[Example], seed: int) -> None:
        if not examples:
            raise ValueError("the training split is empty")
        self.examples, self.seed = examples, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, count: int) -> list[Example]:
        batch = []
        for _ in range(count):
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            batch.append(self.examples[self._order[self.offset]])
            self.offset += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)
