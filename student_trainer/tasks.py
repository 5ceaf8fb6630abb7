"""Built-in tasks: prompt/answer datasets with a metric and reward functions by name.

A task is a seeded generator of examples, split three ways without overlap, plus the
metric used to evaluate predictions. The built-in `addition` task (story problems like
"Ada has 12 apples. Ben gives Ada 3 more, so Ada has" -> " 15.") is written in the same
words the tiny models' tokenizer was trained on, so its prompts encode compactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from teacher_service.tiny_model import ITEMS, NAMES


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # the reference completion (without eos)


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]


def normalize(text: str) -> str:
    """Whitespace-insensitive comparison form of an answer."""
    return " ".join(text.split())


def exact_match(prediction: str, example: Example) -> float:
    return float(normalize(prediction) == normalize(example.answer))


REWARDS: dict[str, Callable[[str, Example], float]] = {"exact_match": exact_match}


def _addition_example(rng: random.Random) -> Example:
    a, b = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    n, m = rng.randint(1, 99), rng.randint(1, 9)
    return Example(f"{a} has {n} {item}s. {b} gives {a} {m} more, so {a} has", f" {n + m}.")


@dataclass(frozen=True)
class Task:
    name: str
    metric_name: str
    make_example: Callable[[random.Random], Example]
    metric: Callable[[str, Example], float]

    def splits(self, train: int, validation: int, test: int, seed: int) -> Splits:
        """Distinct prompts drawn with `seed`: the same seed gives the same splits."""
        rng = random.Random(f"{self.name}:{seed}")
        wanted, seen, examples = train + validation + test, set(), []
        for _ in range(wanted * 50):
            example = self.make_example(rng)
            if example.prompt not in seen:
                seen.add(example.prompt)
                examples.append(example)
                if len(examples) == wanted:
                    break
        else:
            raise ValueError(f"task {self.name!r} has fewer than {wanted} distinct prompts")
        return Splits(
            examples[:train], examples[train : train + validation], examples[train + validation :]
        )


TASKS: dict[str, Task] = {
    "addition": Task("addition", "exact_match", _addition_example, exact_match),
}
