"""The built-in tasks: deterministic, disjoint splits; references and metrics checked
against num2words, Python arithmetic, hand-computed values and an independent chrF."""

from __future__ import annotations

import operator
import re
from collections import Counter

import pytest
import sacrebleu
from num2words import num2words

from student_trainer.tasks import (
    REWARDS,
    TASKS,
    Example,
    corpus_chrf,
    exact_match,
    final_answer,
    final_answer_correct,
    mean_of,
)

REAL_TASKS = ("translation", "arithmetic", "records")


@pytest.mark.parametrize("name", REAL_TASKS)
def test_splits_are_deterministic_per_seed_and_disjoint(name):
    task = TASKS[name]
    first = task.splits(300, 50, 50, seed=0)
    assert first == task.splits(300, 50, 50, seed=0)
    other = task.splits(300, 50, 50, seed=1)
    assert first.train != other.train
    prompts = [{e.prompt for e in part} for part in (first.train, first.validation, first.test)]
    assert [len(p) for p in prompts] == [300, 50, 50]  # distinct within each split
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


def test_translation_references_are_num2words_german_of_the_number():
    examples = TASKS["translation"].splits(200, 0, 0, seed=3).train
    for example in examples:
        number = int(re.fullmatch(r"Number: (\d+)\nGerman:", example.prompt).group(1))
        assert 1 <= number <= 999_999_999
        assert example.answer == " " + num2words(number, lang="de")
    # num2words' German, checked by hand: units before tens, "Millionen" as its own word
    assert num2words(42_105, lang="de") == "zweiundvierzigtausendeinhundertfünf"
    assert num2words(3_000_021, lang="de") == "drei Millionen einundzwanzig"


OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
QUESTION_FORMS = [
    (r"buys (\d+) bags .* with (\d+) .* gives (\d+) ", lambda x, y, z: x * y - z),
    (r"has (\d+) \w+s\. \w+ has (\d+) more .* together", lambda x, y: 2 * x + y),
    (r"has (\d+) \w+s and finds (\d+) more\. .* among (\d+) friends", lambda x, y, k: (x + y) / k),
    (
        r"has (\d+) boxes with (\d+) .* and (\d+) more .* loses (\d+) ",
        lambda x, y, z, w: x * y + z - w,
    ),
]


def test_arithmetic_answers_follow_from_the_question_and_every_step_is_right():
    examples = TASKS["arithmetic"].splits(400, 0, 0, seed=0).train
    seen = set()
    for example in examples:
        for index, (pattern, solve) in enumerate(QUESTION_FORMS):
            found = re.search(pattern, example.prompt)
            if found:
                expected = solve(*map(int, found.groups()))
                seen.add(index)
                break
        else:
            raise AssertionError(f"unknown question form: {example.prompt}")
        assert expected == int(expected) and expected >= 0
        assert final_answer(example.answer) == str(int(expected))
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", example.answer)
        assert len(steps) >= 2
        for a, op, b, result in steps:
            assert OPERATORS[op](int(a), int(b)) == int(result)
    assert seen == {0, 1, 2, 3}


def test_exact_match_and_final_answer_metrics_by_hand():
    example = Example("p", " einundzwanzig")
    assert exact_match("einundzwanzig", example) == 1.0  # leading/trailing space ignored
    assert exact_match(" einundzwanzig tausend", example) == 0.0
    assert mean_of(exact_match)(["einundzwanzig", "zwei"], [example, example]) == 50.0
    cot = Example("q", " 3 * 4 = 12. 12 - 5 = 7. The answer is 7.")
    assert final_answer_correct(" 3 * 4 = 12. The answer is 7.", cot) == 1.0
    assert final_answer_correct(" The answer is 8. The answer is 7.", cot) == 1.0  # the last
    assert final_answer_correct(" 3 * 4 = 12. 12 - 5 = 7.", cot) == 0.0  # no final answer
    assert final_answer_correct(" The answer is 70.", cot) == 0.0
    assert TASKS["arithmetic"].score([" The answer is 7.", "7"], [cot, cot]) == {"accuracy": 50.0}
    assert set(REWARDS) >= {"exact_match", "final_answer", "chrf"}


def _chrf(hypotheses: list[str], references: list[str], order: int = 6, beta: float = 2.0):
    """chrF (Popović 2015) with sacrebleu's corpus statistics and effective order."""
    stats = [[0, 0, 0] for _ in range(order)]
    for hyp, ref in zip(hypotheses, references):
        hyp, ref = "".join(hyp.split()), "".join(ref.split())
        for n in range(1, order + 1):
            h = Counter(hyp[i : i + n] for i in range(len(hyp) - n + 1))
            r = Counter(ref[i : i + n] for i in range(len(ref) - n + 1))
            stats[n - 1][0] += sum(h.values())
            stats[n - 1][1] += sum(r.values())
            stats[n - 1][2] += sum((h & r).values())
    effective = [(m / h, m / r) for h, r, m in stats if h and r]
    precision = sum(p for p, _ in effective) / len(effective)
    recall = sum(r for _, r in effective) / len(effective)
    if precision + recall == 0:
        return 0.0
    return 100 * (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def test_chrf_matches_a_hand_computed_value_and_an_independent_implementation():
    # "abc" vs "abd": unigrams 2/3, bigrams 1/2, trigrams 0 (P = R at every order):
    # average 7/18 both ways, so F2 = 7/18.
    assert corpus_chrf(["abc"], [Example("", "abd")]) == pytest.approx(100 * 7 / 18)
    examples = TASKS["translation"].splits(40, 0, 0, seed=5).train
    predictions = [e.answer[: len(e.answer) * 2 // 3] + "und" for e in examples]
    ours = corpus_chrf(predictions, examples)
    assert ours == pytest.approx(_chrf(predictions, [e.answer for e in examples]))
    assert ours == pytest.approx(
        sacrebleu.CHRF().corpus_score(predictions, [[e.answer.strip() for e in examples]]).score
    )
    assert corpus_chrf([e.answer for e in examples], examples) == pytest.approx(100.0)
    score = REWARDS["chrf"](predictions[0], examples[0])
    assert score == pytest.approx(_chrf([predictions[0]], [examples[0].answer]) / 100)
