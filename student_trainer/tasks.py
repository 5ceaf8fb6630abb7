"""Built-in tasks: seeded prompt/answer datasets with their metrics and rewards.

A task is a seeded generator of examples, split three ways without overlap, plus the
metrics that score a list of predictions and a reward for RL + GKD. Built in:

- `translation`: a number in digits (up to 999,999,999) -> the same number in German words
  (references by `num2words`). German writes numbers as long compounds with the units
  before the tens ("zweiundvierzig Millionen einhundertfünftausend..."), so the model must
  track place values over ~10 tokens and one early mistake derails the rest: the exposure
  bias on-policy distillation is meant to fix. Metrics: exact match, chrF.
- `arithmetic`: GSM8K-style word problems from templates, answered with a written chain
  of thought ending in "The answer is N."; metric: final-answer accuracy.
- `records`: data-to-text (records.py): a venue's attributes -> an English description, with
  thousands of valid renderings per record; metrics: faithful (parsed back, every
  attribute exactly right), chrF against eight references. `records_task` builds variants
  from the generator's parameters (attribute counts, seat numbers, one rendering only);
  `records-4to6` is one: records of 4 to 6 attributes.
- `addition`: one-line sums in the tiny random test models' vocabulary (tests, smoke runs).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import sacrebleu
from num2words import num2words

from student_trainer import records

# the addition task's words (and the tiny models' tokenizer corpus: distill_lab/tiny_model.py)
NAMES = ("Ada", "Ben", "Cleo", "Dara", "Emil", "Fay", "Gus", "Hana", "Ivo", "Juno")
ITEMS = ("apple", "book", "coin", "marble", "pencil", "stamp", "ticket", "shell")


@dataclass(frozen=True)
class Example:
    prompt: str
    # the reference completion (without eos, though a chat template's rendering ends with
    # its end-of-turn text); "" for a prompt-only dataset
    answer: str
    # the prompt is a chat template's rendering (user_data.py): its special tokens (<bos>,
    # turn markers) are in the text already, so encoding it must not add another <bos>
    templated: bool = False


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    # every training example has a reference completion (False: prompts only, which only
    # methods that complete the prompts themselves can train on: on-policy GKD, SeqKD)
    has_completions: bool = True


def normalize(text: str) -> str:
    """Whitespace-insensitive comparison form of an answer."""
    return " ".join(text.split())


def exact_match(prediction: str, example: Example) -> float:
    return float(normalize(prediction) == normalize(example.answer))


_FINAL_ANSWER = re.compile(r"The answer is (-?\d+)")


def final_answer(text: str) -> str | None:
    """The number after the last "The answer is", or None when there is none."""
    found = _FINAL_ANSWER.findall(text)
    return found[-1] if found else None


def final_answer_correct(prediction: str, example: Example) -> float:
    answer = final_answer(prediction)
    return float(answer is not None and answer == final_answer(example.answer))


def sentence_chrf(prediction: str, example: Example) -> float:
    """chrF of one prediction in [0, 1] (sacrebleu's chrF, character 6-grams, beta 2)."""
    return sacrebleu.sentence_chrf(normalize(prediction), [normalize(example.answer)]).score / 100


def corpus_chrf(predictions: list[str], examples: list[Example]) -> float:
    """Corpus-level chrF in [0, 100], as sacrebleu reports it for a test set."""
    return multi_reference_chrf(predictions, [[e.answer] for e in examples])


def multi_reference_chrf(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus chrF with the same number of references per prediction: sacrebleu takes,
    sentence by sentence, the reference with the best chrF."""
    streams = [[normalize(refs[i]) for refs in references] for i in range(len(references[0]))]
    return sacrebleu.corpus_chrf([normalize(p) for p in predictions], streams).score


def mean_of(score: Callable[[str, Example], float]) -> Callable[[list[str], list[Example]], float]:
    """A per-example score averaged over the set, in percent."""

    def metric(predictions: list[str], examples: list[Example]) -> float:
        return 100.0 * sum(score(p, e) for p, e in zip(predictions, examples)) / len(examples)

    return metric


def faithful(prediction: str, example: Example) -> float:
    """1.0 when a records description parses back to exactly the prompt's record."""
    return float(records.faithful(prediction, example.prompt))


REWARDS: dict[str, Callable[[str, Example], float]] = {
    "exact_match": exact_match,
    "final_answer": final_answer_correct,
    "chrf": sentence_chrf,
    "faithful": faithful,
}

Metric = Callable[[list[str], list[Example]], float]


# -- generators -----------------------------------------------------------------------------
def _addition_example(rng: random.Random) -> Example:
    a, b = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    n, m = rng.randint(1, 99), rng.randint(1, 9)
    return Example(f"{a} has {n} {item}s. {b} gives {a} {m} more, so {a} has", f" {n + m}.")


TRANSLATION_MAX = 999_999_999


def _translation_example(rng: random.Random) -> Example:
    number = rng.randint(1, TRANSLATION_MAX)
    return Example(f"Number: {number}\nGerman:", " " + num2words(number, lang="de"))


PEOPLE = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena")
THINGS = ("apple", "book", "card", "cookie", "egg", "marble", "pen", "shell", "sticker", "toy")


def _arithmetic_example(rng: random.Random) -> Example:
    """One of four two- or three-step templates, with the steps written out."""
    a, b = rng.sample(PEOPLE, 2)
    thing = rng.choice(THINGS)
    kind = rng.randrange(4)
    if kind == 0:
        x, y = rng.randint(2, 12), rng.randint(2, 12)
        z = rng.randint(1, x * y - 1)
        question = (
            f"{a} buys {x} bags of {thing}s with {y} {thing}s in each bag. {a} gives {z} "
            f"{thing}s to {b}. How many {thing}s does {a} have now?"
        )
        steps = [f"{x} * {y} = {x * y}.", f"{x * y} - {z} = {x * y - z}."]
        result = x * y - z
    elif kind == 1:
        x, y = rng.randint(10, 99), rng.randint(5, 60)
        question = (
            f"{a} has {x} {thing}s. {b} has {y} more {thing}s than {a}. How many {thing}s "
            "do they have together?"
        )
        steps = [f"{x} + {y} = {x + y}.", f"{x} + {x + y} = {2 * x + y}."]
        result = 2 * x + y
    elif kind == 2:
        k, q = rng.randint(2, 12), rng.randint(2, 12)
        x = rng.randint(1, k * q - 1)
        y = k * q - x
        question = (
            f"{a} has {x} {thing}s and finds {y} more. {a} shares them equally among {k} "
            f"friends. How many {thing}s does each friend get?"
        )
        steps = [f"{x} + {y} = {k * q}.", f"{k * q} / {k} = {q}."]
        result = q
    else:
        x, y, z = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 50)
        w = rng.randint(1, x * y + z - 1)
        question = (
            f"{a} has {x} boxes with {y} {thing}s each and {z} more {thing}s on a shelf. "
            f"{a} loses {w} {thing}s. How many {thing}s are left?"
        )
        steps = [f"{x} * {y} = {x * y}.", f"{x * y} + {z} = {x * y + z}."]
        steps.append(f"{x * y + z} - {w} = {x * y + z - w}.")
        result = x * y + z - w
    return Example(
        f"Question: {question}\nAnswer:", " " + " ".join(steps) + f" The answer is {result}."
    )


@dataclass(frozen=True)
class Task:
    name: str
    make_example: Callable[[random.Random], Example]
    metrics: dict[str, Metric]  # name -> corpus metric in percent; the first is the primary
    reward: str  # the REWARDS entry that fits the task
    max_new_tokens: int  # enough for the longest reference answer

    @property
    def metric_name(self) -> str:
        return next(iter(self.metrics))

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """Every metric of the task on a prediction list (percent)."""
        return {name: metric(predictions, examples) for name, metric in self.metrics.items()}

    def splits(self, train: int, validation: int, test: int, seed: int) -> Splits:
        """Distinct prompts drawn with `seed`, each split from a stream of its own: test
        first, then validation without test's prompts, then train without either. So the
        test prompts are fixed by the task seed alone (a longer test split extends a shorter
        one), and no size of another split moves them."""
        test_part = self._draw(test, f"{self.name}:{seed}:test", set())
        held_out = {e.prompt for e in test_part}
        validation_part = self._draw(validation, f"{self.name}:{seed}:validation", held_out)
        held_out |= {e.prompt for e in validation_part}
        return Splits(
            self._draw(train, f"{self.name}:{seed}:train", held_out), validation_part, test_part
        )

    def _draw(self, count: int, stream: str, excluded: set[str]) -> list[Example]:
        """`count` examples with distinct prompts, none in `excluded`, from `stream`."""
        rng, seen, examples = random.Random(stream), set(excluded), []
        for _ in range(count * 50):
            if len(examples) == count:
                break
            example = self.make_example(rng)
            if example.prompt not in seen:
                seen.add(example.prompt)
                examples.append(example)
        if len(examples) < count:
            raise ValueError(
                f"task {self.name!r} has fewer than {count} distinct prompts outside the "
                "other splits"
            )
        return examples


def records_task(name: str, generator: records.RecordsTask) -> Task:
    """A data-to-text task from a parameterised records generator."""

    def chrf(predictions: list[str], examples: list[Example]) -> float:
        references = [generator.references(e.prompt, e.answer) for e in examples]
        return multi_reference_chrf(predictions, references)

    return Task(
        name,
        lambda rng: Example(*generator.example(rng)),
        {"faithful": mean_of(faithful), "chrf": chrf},
        reward="faithful",
        max_new_tokens=96,
    )


TASKS: dict[str, Task] = {
    "translation": Task(
        "translation",
        _translation_example,
        {"exact_match": mean_of(exact_match), "chrf": corpus_chrf},
        reward="exact_match",
        max_new_tokens=32,
    ),
    "arithmetic": Task(
        "arithmetic",
        _arithmetic_example,
        {"accuracy": mean_of(final_answer_correct)},
        reward="final_answer",
        max_new_tokens=40,
    ),
    "records": records_task("records", records.RecordsTask()),
    # 4 to 6 attributes (the teacher's and students' range is 2 to 6): longer outputs, a
    # variant the paper table's tuning never saw (issue 29's fair comparison runs it)
    "records-4to6": records_task("records-4to6", records.RecordsTask(min_attributes=4)),
    "addition": Task(
        "addition", _addition_example, {"exact_match": mean_of(exact_match)}, "exact_match", 16
    ),
}
