"""`records`: a data-to-text task with many valid outputs and a checker that credits each.

A record (a venue with 2 to 6 of 7 attributes, in the manner of the E2E NLG challenge) is
rendered as a short English description. One record has thousands of valid renderings:
three opening sentences, any order of the attributes, one or two attributes a sentence,
two subjects, three phrasings of every attribute (six for the seats, in digits or words).
The teacher learns the whole distribution, so at every choice point it spreads its
probability over the valid options: the "dark knowledge" that supervised KD and on-policy
distillation can transfer and a single reference cannot.

Every output is scored by parsing it back (`parse`) with the grammar that generates it:
*faithful* when it is well-formed (every sentence is one the generator writes: at most two
attributes joined with "and", one in the opening's relative clause) and states every
attribute of the record exactly once with its value, and nothing else. chrF is computed
against eight references drawn for the prompt, so it credits partly right outputs.

`RecordsTask` takes the generator's parameters (attribute counts, the range of seat
numbers, and `Grammar(single=True)`, which renders each record one way only), so the same
protocol runs on variants of the task (`tasks.records_task` registers one).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

from num2words import num2words


def normalize(text: str) -> str:
    return " ".join(text.split())


# Venue names are two words, 256 of them: copying one from the record (where it is
# tokenized differently, after "=") into the text takes attention over the prompt.
NAME_WORDS = (
    ("Golden", "Blue", "Red", "Old", "Little", "Royal", "Green", "Silver", "Black", "White",
     "Happy", "Lucky", "Crown", "Grand", "Wild", "Sunny"),
    ("Lion", "Palace", "Spice", "Eagle", "Curry", "Mill", "Dragon", "Garden", "Rose", "Bell",
     "Anchor", "Oak", "Fox", "Swan", "Lantern", "Harbour"),
)  # fmt: skip
VENUES = tuple(f"{first} {second}" for first in NAME_WORDS[0] for second in NAME_WORDS[1])
TYPES = ("restaurant", "pub", "coffee shop")
FOODS = ("Italian", "French", "Chinese", "Indian", "Japanese", "English", "Thai")
PRICES = ("cheap", "moderate", "high")
AREAS = ("city centre", "riverside")
RATINGS = ("1", "2", "3", "4", "5")
FAMILY = ("yes", "no")
ATTRIBUTES = ("food", "price", "area", "rating", "family", "seats", "near")  # + name, type
SEATS = (10, 999)  # the range of seats, written in digits (copied) or in words (composed)
SENTENCE_SIZES = (1, 2)  # verb phrases a body sentence joins with "and"; a relative clause: 1

# Each attribute's verb phrases (subject "It" or "The <type>"), value -> phrasings.
PRICE_PHRASES = {
    "cheap": ("is cheap", "has low prices", "is inexpensive"),
    "moderate": ("is moderately priced", "has average prices", "is mid-priced"),
    "high": ("is expensive", "has high prices", "is pricey"),
}
FAMILY_PHRASES = {
    "yes": ("is family friendly", "is kid friendly", "welcomes children"),
    "no": ("is not family friendly", "is not kid friendly", "does not welcome children"),
}


def _food(value: str) -> tuple[str, ...]:
    return (f"serves {value} food", f"offers {value} cuisine", f"has {value} food on the menu")


def _area(value: str) -> tuple[str, ...]:
    return (f"is in the {value}", f"is located in the {value}", f"can be found in the {value}")


def _rating(value: str) -> tuple[str, ...]:
    return (
        f"is rated {value} out of 5",
        f"has a customer rating of {value} out of 5",
        f"is rated {number_words(value)} out of five",
    )


def _near(value: str) -> tuple[str, ...]:
    return (f"is near {value}", f"is close to {value}", f"is located near {value}")


def number_words(value: str) -> str:
    """146 -> "one hundred forty-six" (no "and": the grammar joins phrases with it)."""
    return num2words(int(value), lang="en").replace(" and ", " ")


def _seats(value: str) -> tuple[str, ...]:
    forms = (value, number_words(value))  # in digits or in words, either is right
    return tuple(
        phrase
        for form in forms
        for phrase in (f"has {form} seats", f"seats {form} guests", f"can hold {form} people")
    )


def phrasings(attribute: str, value: str) -> tuple[str, ...]:
    """Every verb phrase that states `attribute = value`, the canonical one first."""
    if attribute == "price":
        return PRICE_PHRASES[value]
    if attribute == "family":
        return FAMILY_PHRASES[value]
    build = {"food": _food, "area": _area, "rating": _rating, "seats": _seats, "near": _near}
    return build[attribute](value)


Record = dict[str, str]  # name, type, then some of ATTRIBUTES, in that order


def format_record(record: Record) -> str:
    return "; ".join(f"{key}={value}" for key, value in record.items())


def parse_record(prompt: str) -> Record:
    """The record back from a prompt "Record: name=...; type=...; ...\\nText:"."""
    body = prompt.removeprefix("Record: ").removesuffix("\nText:")
    return dict(item.split("=", 1) for item in body.split("; "))


# -- rendering ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grammar:
    """How varied the renderings are; `single` keeps one way per record (a control)."""

    single: bool = False

    def render(self, record: Record, rng: random.Random) -> str:
        """One valid description of `record`, its choices drawn from `rng`."""
        name, kind = record["name"], record["type"]
        facts = [(key, record[key]) for key in ATTRIBUTES if key in record]
        if self.single:
            phrases = [phrasings(k, v)[0] for k, v in facts]
            intro, subjects, grouping = 0, ["It"], [1] * len(phrases)
        else:
            rng.shuffle(facts)
            phrases = [rng.choice(phrasings(k, v)) for k, v in facts]
            intro = rng.randrange(3)
            subjects = ["It", f"The {kind}"]
            grouping = []
            while sum(grouping) < len(phrases):
                grouping.append(min(rng.choice(SENTENCE_SIZES), len(phrases) - sum(grouping)))
        sentences = []
        if intro == 0:
            sentences.append(f"{name} is a {kind}")
        elif intro == 1:
            sentences.append(f"There is a {kind} called {name}")
        else:  # the first attribute in a relative clause
            sentences.append(f"{name} is a {kind} that {phrases.pop(0)}")
            grouping = _regroup(grouping)
        for size in grouping:
            subject = subjects[0] if self.single else rng.choice(subjects)
            sentences.append(f"{subject} " + " and ".join(phrases[:size]))
            phrases = phrases[size:]
        return " ".join(f"{s}." for s in sentences)


def _regroup(grouping: list[int]) -> list[int]:
    """One phrase fewer to place: take it from the first sentence."""
    first, *rest = grouping
    return ([first - 1] if first > 1 else []) + rest


# -- parsing --------------------------------------------------------------------------------
def _alternatives(values: tuple[str, ...]) -> str:
    return "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))


@lru_cache(maxsize=1)
def _phrase_table() -> dict[str, tuple[str, str]]:
    """Every verb phrase the grammar can produce -> (attribute, value), seats aside."""
    table = {}
    values = {
        "food": FOODS, "price": PRICES, "area": AREAS, "rating": RATINGS, "family": FAMILY,
        "near": VENUES,
    }  # fmt: skip
    for attribute, choices in values.items():
        for value in choices:
            for phrase in phrasings(attribute, value):
                table[phrase] = (attribute, value)
    return table


_NAME, _TYPE = _alternatives(VENUES), _alternatives(TYPES)
_INTRO = re.compile(
    rf"(?:(?P<n1>{_NAME}) is a (?P<t1>{_TYPE})(?: that (?P<vp>.+))?"
    rf"|There is a (?P<t2>{_TYPE}) called (?P<n2>{_NAME}))"
)
_BODY = re.compile(rf"(?:It|The (?P<type>{_TYPE})) (?P<vps>.+)")
_SEATS = re.compile(r"has (.+) seats|seats (.+) guests|can hold (.+) people")
_DIGITS = re.compile(r"[1-9]\d*")


@lru_cache(maxsize=1)
def _number_table() -> dict[str, str]:
    """Number words -> digits, for every number the seats of any generator can take."""
    return {number_words(str(n)): str(n) for n in range(1, 10_000)}


def _statement(phrase: str) -> tuple[str, str] | None:
    """(attribute, value) of one verb phrase, or None when the grammar has no such phrase."""
    found = _phrase_table().get(phrase)
    if found is None and (seats := _SEATS.fullmatch(phrase)):
        number = next(group for group in seats.groups() if group)
        value = number if _DIGITS.fullmatch(number) else _number_table().get(number)
        found = None if value is None else ("seats", value)
    return found


def parse(text: str) -> Record | None:
    """The record a description states, or None when it is not well-formed: a sentence
    the grammar cannot produce (more verb phrases joined with "and" than it puts in one,
    an unknown phrase), an attribute stated twice, or a subject of the wrong type."""
    text = normalize(text)
    if not text.endswith("."):
        return None
    sentences = text[:-1].split(". ")
    intro = _INTRO.fullmatch(sentences[0])
    if intro is None:
        return None
    record = {
        "name": intro["n1"] or intro["n2"],
        "type": intro["t1"] or intro["t2"],
    }
    clauses = [(intro["vp"], 1)] if intro["vp"] else []  # a relative clause holds one
    for sentence in sentences[1:]:
        body = _BODY.fullmatch(sentence)
        if body is None or body["type"] not in (None, record["type"]):
            return None
        clauses.append((body["vps"], max(SENTENCE_SIZES)))
    phrases = []
    for clause, most in clauses:
        joined = clause.split(" and ")  # no phrase contains " and " (see number_words)
        if len(joined) > most:
            return None
        phrases += joined
    for phrase in phrases:
        statement = _statement(phrase)
        if statement is None:
            return None
        attribute, value = statement
        if attribute in record:
            return None
        record[attribute] = value
    return record


def faithful(prediction: str, prompt: str) -> bool:
    """Well-formed, and states exactly the prompt's record."""
    return parse(prediction) == parse_record(prompt)


# -- the generator ----------------------------------------------------------------------
REFERENCES = 8  # drawn per prompt for chrF


@dataclass(frozen=True)
class RecordsTask:
    """The generator's parameters: attribute counts and the grammar's variety."""

    min_attributes: int = 2
    max_attributes: int = 6
    seats: tuple[int, int] = SEATS
    grammar: Grammar = Grammar()

    def __post_init__(self) -> None:
        if not 1 <= self.min_attributes <= self.max_attributes <= len(ATTRIBUTES):
            raise ValueError(
                f"attribute counts: need 1 <= min ({self.min_attributes}) <= max "
                f"({self.max_attributes}) <= {len(ATTRIBUTES)}"
            )
        if not 1 <= self.seats[0] <= self.seats[1] < 10_000:
            raise ValueError(f"seats: {self.seats} is not a range of positive numbers")

    def record(self, rng: random.Random) -> Record:
        name, near = rng.sample(VENUES, 2)
        count = rng.randint(self.min_attributes, self.max_attributes)
        chosen = set(rng.sample(ATTRIBUTES, count))
        values = {
            "food": rng.choice(FOODS), "price": rng.choice(PRICES), "area": rng.choice(AREAS),
            "rating": rng.choice(RATINGS), "family": rng.choice(FAMILY),
            "seats": str(rng.randint(*self.seats)), "near": near,
        }  # fmt: skip
        return {"name": name, "type": rng.choice(TYPES)} | {
            key: values[key] for key in ATTRIBUTES if key in chosen
        }

    def example(self, rng: random.Random) -> tuple[str, str]:
        """(prompt, reference completion) for a fresh record."""
        record = self.record(rng)
        return f"Record: {format_record(record)}\nText:", " " + self.grammar.render(record, rng)

    def references(self, prompt: str, answer: str) -> list[str]:
        """The example's own answer and REFERENCES - 1 more drawn, seeded by the prompt."""
        record = parse_record(prompt)
        rng = random.Random(f"references:{prompt}")
        drawn = [self.grammar.render(record, rng) for _ in range(REFERENCES - 1)]
        return [normalize(answer), *drawn]
