"""The records (data-to-text) task: a deterministic generator of records with many valid
renderings, and a checker that parses any of them back, checked on hand-written cases
(valid alternatives the references do not contain, and every kind of mistake) and against
every rendering the generator can write for small records (and nothing more)."""

from __future__ import annotations

import itertools
import random

import pytest
import sacrebleu

from student_trainer import records
from student_trainer.records import Grammar, RecordsTask, parse, parse_record
from student_trainer.tasks import TASKS, Example, faithful

RECORD = {
    "name": "Golden Eagle",
    "type": "pub",
    "food": "Italian",
    "rating": "4",
    "family": "no",
    "seats": "120",
    "near": "Blue Mill",
}
PROMPT = f"Record: {records.format_record(RECORD)}\nText:"


def test_prompts_carry_the_record_and_parse_back():
    assert PROMPT == (
        "Record: name=Golden Eagle; type=pub; food=Italian; rating=4; family=no; seats=120; "
        "near=Blue Mill\nText:"
    )
    assert parse_record(PROMPT) == RECORD


def test_every_generated_reference_is_faithful_to_its_record():
    task = TASKS["records"]
    for example in task.splits(300, 0, 0, seed=2).train:
        record = parse_record(example.prompt)
        assert 2 <= len(record) - 2 <= 6
        assert parse(example.answer) == record
        for reference in RecordsTask().references(example.prompt, example.answer):
            assert faithful(reference, example) == 1.0


def test_seats_are_written_in_digits_or_in_words():
    assert records.number_words("146") == "one hundred forty-six"
    assert records.number_words("999") == "nine hundred ninety-nine"
    assert set(records.phrasings("seats", "21")) >= {"has 21 seats", "seats twenty-one guests"}
    rendered = [Grammar().render(RECORD, random.Random(seed)) for seed in range(60)]
    assert any("120" in text for text in rendered)
    assert any("one hundred twenty" in text for text in rendered)


def test_generator_parameters_shape_the_records():
    rng = random.Random(1)
    narrow = RecordsTask(min_attributes=1, max_attributes=1, seats=(7, 7))
    for _ in range(50):
        record = narrow.record(rng)
        assert len(record) == 3 and record.get("seats", "7") == "7"


def test_a_record_has_many_renderings_and_the_single_grammar_one():
    rng = random.Random(0)
    many = {Grammar().render(RECORD, rng) for _ in range(300)}
    assert len(many) > 290  # 3 intros x 5! orders x 3^4 x 6 phrasings x groupings x subjects
    single = {Grammar(single=True).render(RECORD, rng) for _ in range(20)}
    assert single == {
        "Golden Eagle is a pub. It serves Italian food. It is rated 4 out of 5. "
        "It is not family friendly. It has 120 seats. It is near Blue Mill."
    }


@pytest.mark.parametrize(
    "text",
    [
        # valid renderings written by hand: other orders, phrasings, groupings, subjects
        "There is a pub called Golden Eagle. It is close to Blue Mill and is rated four out "
        "of five. The pub is not kid friendly and offers Italian cuisine. It seats 120 guests.",
        "Golden Eagle is a pub that does not welcome children. The pub has a customer rating "
        "of 4 out of 5. It can hold one hundred twenty people and is located near Blue Mill. It "
        "has Italian food on the menu.",
        "  Golden Eagle is a pub.  The pub serves Italian food and is near Blue Mill. It is "
        "not family friendly and is rated 4 out of 5. It has 120 seats. ",  # spaces not judged
    ],
)
def test_valid_alternatives_outside_the_references_are_faithful(text):
    example = Example(PROMPT, " Golden Eagle is a pub.")
    assert " ".join(text.split()) not in RecordsTask().references(PROMPT, example.answer)
    assert parse(text) == RECORD
    assert faithful(text, example) == 1.0


def _without(key: str) -> dict[str, str]:
    return {k: v for k, v in RECORD.items() if k != key}


FULL = (
    "Golden Eagle is a pub. It serves Italian food and is rated 4 out of 5. It is not family "
    "friendly. It has 120 seats. It is near Blue Mill."
)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        (FULL, RECORD),  # the control: this one is right
        # well-formed but unfaithful: the parse is right, the record is not
        (FULL.replace(" It is not family friendly.", ""), _without("family")),
        (FULL.replace("rated 4", "rated 3"), RECORD | {"rating": "3"}),
        (FULL.replace("is not family", "is family"), RECORD | {"family": "yes"}),
        (FULL.replace("120 seats", "12 seats"), RECORD | {"seats": "12"}),
        (FULL + " It is cheap.", RECORD | {"price": "cheap"}),  # an invented attribute
        (FULL.replace("Golden Eagle is", "Red Mill is"), RECORD | {"name": "Red Mill"}),
        (FULL.replace("near Blue Mill", "near Golden Eagle"), RECORD | {"near": "Golden Eagle"}),
        # not well-formed: nothing is parsed
        (FULL + " It serves Italian food.", None),  # said twice
        (FULL.replace("It has 120", "The restaurant has 120"), None),  # wrong subject
        (FULL.removesuffix("."), None),  # cut off
        (FULL.replace("Italian", "italian"), None),  # not a known value
        (FULL.replace("120 seats", "0120 seats"), None),  # not a number as written
        (FULL.replace("120 seats", "one hundred and twenty seats"), None),  # "and" joins phrases
        (FULL.replace("120 seats", "one hundred twenty-one seats"), RECORD | {"seats": "121"}),
        (FULL.replace("120 seats", "one hundered twenty seats"), None),  # misspelt
        ("Golden Eagle is a pub that serves Italian food and is near Blue Mill.", None),
        ("Golden is a pub. It serves Italian food.", None),  # not a venue
        ("", None),
    ],
)
def test_mistakes_are_caught(text, parsed):
    assert parse(text) == parsed
    assert faithful(text, Example(PROMPT, "")) == float(parsed == RECORD)


def test_chrf_takes_the_best_of_eight_references_per_sentence():
    task = TASKS["records"]
    examples = task.splits(30, 0, 0, seed=4).train
    predictions = [e.answer[: len(e.answer) // 2] for e in examples]
    ours = task.metrics["chrf"](predictions, examples)
    generator = RecordsTask()
    # independently: per sentence the reference with the highest sentence chrF; corpus
    # statistics are then summed, so compare against one-reference corpus chrF on them
    best = []
    for prediction, example in zip(predictions, examples):
        refs = generator.references(example.prompt, example.answer)
        assert len(refs) == records.REFERENCES and refs[0] == example.answer.strip()
        scores = [sacrebleu.sentence_chrf(prediction.strip(), [r]).score for r in refs]
        best.append(refs[scores.index(max(scores))])
    expected = sacrebleu.corpus_chrf([p.strip() for p in predictions], [best]).score
    assert ours == pytest.approx(expected)
    assert task.metrics["chrf"]([e.answer for e in examples], examples) == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("options", "field"),
    [({"min_attributes": 0}, "attribute counts"), ({"max_attributes": 8}, "attribute counts"),
     ({"seats": (0, 5)}, "seats")],
)  # fmt: skip
def test_impossible_generator_parameters_are_refused(options, field):
    with pytest.raises(ValueError, match=field):
        RecordsTask(**options)


class _Script:
    """A stand-in for `random.Random` that makes the choices in `path` (0 past its end) and
    records each choice's width, so that a depth-first search drives `Grammar.render`
    through every branch; `shuffle` picks one of all the permutations."""

    def __init__(self, path: list[int]):
        self.path, self.widths = path, []

    def _pick(self, width: int) -> int:
        index = self.path[len(self.widths)] if len(self.widths) < len(self.path) else 0
        self.widths.append(width)
        return index

    def shuffle(self, items: list) -> None:
        orders = list(itertools.permutations(items))
        items[:] = orders[self._pick(len(orders))]

    def choice(self, options):
        return options[self._pick(len(options))]

    def randrange(self, stop: int) -> int:
        return self._pick(stop)


def _every_rendering(record: dict[str, str]) -> set[str]:
    """The generator's language for `record`: every text `Grammar().render` can write."""
    language, path = set(), []
    while True:
        script = _Script(path)
        language.add(Grammar().render(record, script))
        path = path + [0] * (len(script.widths) - len(path))  # the choices it made
        while path and path[-1] == script.widths[len(path) - 1] - 1:
            path.pop()  # that choice is exhausted: backtrack
        if not path:
            return language
        path[-1] += 1


def _compositions(total: int, most: int):
    """Every way to cut `total` phrases into consecutive sentences of 1..`most` each."""
    if total == 0:
        yield ()
    for first in range(1, min(most, total) + 1):
        for rest in _compositions(total - first, most):
            yield (first, *rest)


def _candidates(record: dict[str, str]):
    """A strict superset of the language: every opening, with or without a relative clause
    of 1 to 3 phrases, body sentences of 1 to 3 phrases, any subject (of any type), every
    phrasing and every order."""
    name, kind = record["name"], record["type"]
    facts = [(k, v) for k, v in record.items() if k not in ("name", "type")]
    openings = (f"{name} is a {kind}", f"There is a {kind} called {name}")
    subjects = ("It", *(f"The {t}" for t in records.TYPES))
    for order in itertools.permutations(facts):
        for phrases in itertools.product(*(records.phrasings(k, v) for k, v in order)):
            for opening, relative in itertools.product(openings, range(len(phrases) + 1)):
                first = opening
                if relative:  # the generator only writes one, after "<name> is a <type>"
                    first += " that " + " and ".join(phrases[:relative])
                for sizes in _compositions(len(phrases) - relative, 3):
                    for chosen in itertools.product(subjects, repeat=len(sizes)):
                        sentences, rest = [first], phrases[relative:]
                        for subject, size in zip(chosen, sizes):
                            sentences.append(f"{subject} {' and '.join(rest[:size])}")
                            rest = rest[size:]
                        yield " ".join(f"{s}." for s in sentences)


@pytest.mark.parametrize(("attributes", "seed"), [(2, 0), (2, 1), (2, 2), (3, 1), (3, 2)])
def test_the_checker_accepts_exactly_the_renderings_the_generator_can_write(attributes, seed):
    record = RecordsTask(attributes, attributes).record(random.Random(seed))
    language = _every_rendering(record)
    candidates = set(_candidates(record))
    assert language < candidates  # a strict superset, or the test proves nothing
    for text in candidates:
        assert (parse(text) == record) == (text in language), text


def test_a_sentence_joining_three_attributes_is_rejected():
    two = "Golden Eagle is a pub. It is cheap and is family friendly. It has 40 seats."
    three = "Golden Eagle is a pub. It is cheap and is family friendly and has 40 seats."
    record = {"name": "Golden Eagle", "type": "pub", "price": "cheap", "family": "yes"}
    assert parse(two) == record | {"seats": "40"}
    assert parse(three) is None
    assert parse("Golden Eagle is a pub that is cheap. It is family friendly.") == record
    assert parse("Golden Eagle is a pub that is cheap and is family friendly.") is None
