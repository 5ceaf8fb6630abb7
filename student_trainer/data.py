"""The configured task's examples, as token ids and back, and a seeded, resumable stream
of training examples."""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import Any

from student_trainer.config import FILE_TASK, MethodConfig, TaskConfig
from student_trainer.tasks import TASKS, Example, Splits
from student_trainer.user_data import load_user_splits, require_completions


def task_splits(task: TaskConfig, tokenizer: Any = None) -> Splits:
    """The task's train / validation / test examples (task.seed decides them): a built-in
    task's, or the user's files (task.name=file), whose conversations are rendered with
    `tokenizer`'s chat template (the student's: the teacher's must be the same)."""
    if task.name == FILE_TASK:
        return load_user_splits(task, tokenizer)
    return TASKS[task.name].splits(task.train_size, task.validation_size, task.test_size, task.seed)


def training_splits(task: TaskConfig, method: MethodConfig, tokenizer: Any) -> Splits:
    """`task_splits`, refused when the method needs completions the data does not have."""
    splits = task_splits(task, tokenizer)
    require_completions(method, task, splits)
    return splits


def encode_prompt(tokenizer: Any, text: str, *, special_tokens: bool = True) -> list[int]:
    """The prompt as the model sees it, with the tokenizer's special tokens (e.g. <bos>)
    unless `special_tokens` is False (a chat template's rendering has its own)."""
    return list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])


def prompt_ids(tokenizer: Any, example: Example) -> list[int]:
    """An example's prompt as token ids: a chat-rendered prompt is encoded as is, exactly
    as `apply_chat_template(..., tokenize=True)` would (no second <bos>)."""
    return encode_prompt(tokenizer, example.prompt, special_tokens=not example.templated)


def encode_answer(tokenizer: Any, text: str) -> list[int]:
    """The reference completion: its tokens then eos, so stopping is learned too (a chat
    template's rendering may end in the eos already: it is not doubled)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids if ids and ids[-1] == tokenizer.eos_token_id else [*ids, tokenizer.eos_token_id]


def decode_completion(tokenizer: Any, ids: list[int], eos_ids: Collection[int]) -> str:
    """A completion's text, without its eos (what the task's metrics and rewards read)."""
    return tokenizer.decode([t for t in ids if t not in eos_ids], skip_special_tokens=True)


def reference_text(tokenizer: Any, example: Example, eos_ids: Collection[int]) -> str:
    """The example's completion as the student's own output would read if it generated
    exactly that: encoded, cut after the first eos, decoded without special tokens. A
    chat-rendered answer ("Hi<end_of_turn>\n") thus compares with predictions as "Hi"."""
    ids = encode_answer(tokenizer, example.answer)
    end = next((i for i, token in enumerate(ids) if token in eos_ids), len(ids))
    return decode_completion(tokenizer, ids[:end], eos_ids)


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
