"""Distilling on the user's own data (task.name=file): every file type in every TRL format,
chat rendering, splits, bad records named by file, line and field, the methods a
prompt-only file refuses, and real training steps evaluated with a custom metric.

Files are written and read with the real `datasets` library; nothing is mocked.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import datasets
import pytest
from transformers import AutoTokenizer

from student_trainer.cli import main
from student_trainer.config import ConfigError, MethodConfig, load_config
from student_trainer.data import prompt_ids, training_splits
from student_trainer.tasks import Example
from student_trainer.train import Trainer, train
from student_trainer.user_data import (
    DataError,
    load_user_splits,
    require_completions,
    split_size,
)
from tests.trainer_helpers import in_process, small_config

# a tiny chat template in the style of real ones: it writes <bos> itself, each turn ends
# with <eos>, and the generation prompt opens the assistant's turn
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPTS = ["Ada has 12 apples.", "Ben finds 3 coins", "Cleo sells 7 marbles,", "Dara has"]
REPLIES = [" So she has 12.", " and 4 books.", " so Cleo has 40.", " 9 shells."]


@pytest.fixture
def chat_tokenizer(student_model_dir):
    """The tiny student's tokenizer (a fresh copy) with a chat template."""
    tokenizer = AutoTokenizer.from_pretrained(student_model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def rows_of(format: str) -> list[dict[str, Any]]:
    """The same four records in one of TRL's formats ("chat_*": conversational)."""
    chat = [[{"role": "user", "content": p}] for p in PROMPTS]
    replies = [[{"role": "assistant", "content": r}] for r in REPLIES]
    return {
        "prompt": [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)],
        "prompt_completion": [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, REPLIES)],
        "chat_prompt": [{"prompt": m} for m in chat],
        "chat_prompt_completion": [{"prompt": m, "completion": r} for m, r in zip(chat, replies)],
        "messages": [{"messages": m + r} for m, r in zip(chat, replies)],
        "messages_prompt": [{"messages": m} for m in chat],  # no reply: prompts
    }[format]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    """`rows` as the file type `path`'s suffix says (a directory when it has none)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def file_task(path: Path, *overrides: str):
    settings = ["teacher.address=unused:1", "task.name=file", f"task.train_file={path}"]
    return load_config(None, [*settings, *overrides]).task


def expected_examples(format: str, tokenizer) -> list[Example]:
    """What each format should become, computed without the loader."""
    if format == "prompt":
        return [Example(p, "") for p in PROMPTS]
    if format == "prompt_completion":
        return [Example(p, c) for p, c in zip(PROMPTS, REPLIES)]
    examples = []
    for prompt, reply in zip(PROMPTS, REPLIES):
        chat = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(
            [*chat, {"role": "assistant", "content": reply}], tokenize=False
        )
        answer = "" if format in PROMPT_ONLY else whole[len(text) :]
        examples.append(Example(text, answer, templated=True))
    return examples


PROMPT_ONLY = ("prompt", "chat_prompt", "messages_prompt")
FILE_TYPES = ["train.jsonl", "train.json", "train.parquet", "train.csv", "saved"]
CASES = [(name, fmt) for name in FILE_TYPES for fmt in ("prompt", "prompt_completion")] + [
    (name, fmt)
    for name in FILE_TYPES
    if name != "train.csv"  # CSV cells hold no lists: conversations need the other types
    for fmt in ("chat_prompt", "chat_prompt_completion", "messages", "messages_prompt")
]


@pytest.mark.parametrize(("name", "format"), CASES)
def test_every_format_from_every_file_type_loads_into_the_expected_examples(
    tmp_path, chat_tokenizer, name, format
):
    path = write(tmp_path / name, rows_of(format))
    splits = load_user_splits(file_task(path), chat_tokenizer)
    assert splits.train == expected_examples(format, chat_tokenizer)
    assert splits.validation == [] and splits.test == []
    assert splits.has_completions == (format not in PROMPT_ONLY)


def test_a_chat_prompt_is_the_tokenizers_own_rendering_with_a_single_bos(tmp_path, chat_tokenizer):
    path = write(tmp_path / "chat.jsonl", rows_of("messages"))
    example = load_user_splits(file_task(path), chat_tokenizer).train[0]
    chat = [{"role": "user", "content": PROMPTS[0]}]
    ids = chat_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert prompt_ids(chat_tokenizer, example) == list(ids)
    assert prompt_ids(chat_tokenizer, example).count(chat_tokenizer.bos_token_id) == 1
    # a plain-text prompt still gets the tokenizer's <bos>, as the built-in tasks' do
    plain = prompt_ids(chat_tokenizer, Example(PROMPTS[0], ""))
    assert plain[0] == chat_tokenizer.bos_token_id and plain.count(plain[0]) == 1


def test_the_validation_split_comes_from_its_file_or_a_seeded_fraction(tmp_path):
    rows = [{"prompt": f"Ada has {n} apples."} for n in range(40)]
    train_path = write(tmp_path / "train.jsonl", rows)
    held_path = write(tmp_path / "held.jsonl", rows[:3])
    from_file = load_user_splits(file_task(train_path, f"task.validation_file={held_path}"), None)
    assert len(from_file.train) == 40 and [e.prompt for e in from_file.validation] == [
        r["prompt"] for r in rows[:3]
    ]

    def fraction(seed: int):
        task = file_task(train_path, "task.validation_fraction=0.25", f"task.seed={seed}")
        return load_user_splits(task, None)

    first, again, other = fraction(0), fraction(0), fraction(1)
    assert (len(first.train), len(first.validation)) == (30, 10)
    assert first == again  # seeded: the same seed holds out the same records
    assert first.validation != other.validation
    held = {e.prompt for e in first.validation}
    assert held.isdisjoint(e.prompt for e in first.train)
    assert held | {e.prompt for e in first.train} == {r["prompt"] for r in rows}


def chat_line(*roles: str) -> str:
    """A JSONL line of one conversation whose messages have these roles."""
    return json.dumps({"messages": [{"role": r, "content": "Hi"} for r in roles]}) + "\n"


BAD_RECORDS = [
    # (file name, file text, format, the error's text)
    (
        "train.jsonl",
        '{"prompt": "Ada has"}\n\n{"prompt": "Ben has"}\n{"prompt": null}\n',
        "auto",
        'train.jsonl line 4: "prompt": expected a string, got null',
    ),
    (
        "train.jsonl",
        '{"prompt": "Ada has"}\n{"prompt": 17}\n',
        "auto",
        'train.jsonl line 2: "prompt": expected a string',
    ),
    (
        "train.jsonl",
        '{"prompt": "Ada has"}\n{"prompt": "Ben", "oops"\n',
        "auto",
        "train.jsonl line 2: not valid JSON",
    ),
    (
        "train.jsonl",
        '{"prompt": "Ada has"}\n{"prompt": "   "}\n',
        "auto",
        'train.jsonl line 2: "prompt": empty',
    ),
    (
        "train.json",
        '[{"prompt": "Ada has", "completion": " 3."}, {"prompt": "Ben", "completion": null}]',
        "auto",
        'train.json record 1: "completion": expected a string, got null',
    ),
    (
        "train.csv",
        'prompt,completion\n"Ada has", 3.\n"",4.\n',
        "auto",
        'train.csv line 3: "prompt": empty',
    ),
    (
        "train.jsonl",
        chat_line("user", "assistant") + chat_line("user", "robot"),
        "auto",
        "train.jsonl line 2: \"messages\"[1].role: 'robot' is not one of system",
    ),
    (
        "train.jsonl",
        chat_line("user", "assistant") + chat_line("assistant"),
        "auto",
        'train.jsonl line 2: "messages": only the assistant\'s reply, no prompt',
    ),
    (
        "train.jsonl",
        '{"question": "Ada has", "answer": " 3."}\n',
        "auto",
        'train.jsonl: no "prompt" or "messages" column (columns: question, answer)',
    ),
    (
        "train.jsonl",
        '{"prompt": "Ada has"}\n',
        "prompt_completion",
        'train.jsonl: no "completion" column, which task.format=prompt_completion needs',
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "format", "message"),
    BAD_RECORDS,
    ids=[
        "null",
        "number",
        "bad-json",
        "empty",
        "json-array",
        "csv-empty-cell",
        "bad-role",
        "no-prompt",
        "missing-column",
        "format-column",
    ],
)
def test_a_bad_record_is_named_by_file_line_and_field(
    tmp_path, chat_tokenizer, name, text, format, message
):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        load_user_splits(file_task(path, f"task.format={format}"), chat_tokenizer)
    assert str(caught.value).startswith(str(tmp_path))
    assert message in str(caught.value)


def test_a_parquet_row_is_named_by_its_index(tmp_path):
    path = write(tmp_path / "train.parquet", [{"prompt": "Ada has"}, {"prompt": None}])
    with pytest.raises(DataError, match=r'train.parquet row 1: "prompt": expected a string'):
        load_user_splits(file_task(path), None)


def test_a_conversation_needs_a_chat_template(tmp_path, student_model_dir):
    path = write(tmp_path / "chat.jsonl", rows_of("chat_prompt"))
    plain = AutoTokenizer.from_pretrained(student_model_dir)
    plain.chat_template = None
    with pytest.raises(DataError, match=r'chat.jsonl line 1: "prompt" is a conversation.*chat'):
        load_user_splits(file_task(path), plain)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["task.name=file"], "task.train_file"),
        (["task.train_file=x.jsonl"], "task.train_file"),  # not the file task
        (["task.name=file", "task.train_file=x.jsonl", "task.format=chatml"], "task.format"),
        (
            [
                "task.name=file",
                "task.train_file=x.jsonl",
                "task.validation_file=y.jsonl",
                "task.validation_fraction=0.1",
            ],
            "task.validation_fraction",
        ),
        (["task.name=file", "task.train_file=x.jsonl", "task.metric=nowhere:f"], "task.metric"),
        (["task.name=file", "task.train_file=x.jsonl", "task.metric=json"], "task.metric"),
    ],
)
def test_bad_file_task_keys_are_refused_by_name(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_config(None, overrides)


def test_the_cli_stops_on_a_bad_record_before_training(
    tmp_path, student_model_dir, tiny_model_dir, capsys
):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "Ada has"}\n{"prompt": ""}\n')
    settings = [
        "task.name=file",
        f"task.train_file={path}",
        f"student.model={student_model_dir}",
        f"teacher.in_process={tiny_model_dir}",
        f"run.out_dir={tmp_path / 'run'}",
    ]
    with pytest.raises(SystemExit) as exited:
        main(["train", *(arg for s in settings for arg in ("--set", s))])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert f'student-trainer: bad data: {path} line 2: "prompt": empty' in error
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_eval_counts_a_split_and_refuses_one_that_is_not_there(tmp_path):
    path = write(tmp_path / "train.jsonl", [{"prompt": f"Ada has {n}"} for n in range(10)])
    assert split_size(file_task(path, "task.validation_fraction=0.3"), "validation") == 3
    with pytest.raises(ConfigError, match=r"^task.test_file:"):
        split_size(file_task(path), "test")
    with pytest.raises(ConfigError, match=r"^task.validation_file:"):
        split_size(file_task(path), "validation")


def test_a_missing_file_is_refused_naming_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^task.train_file: .*nothere.jsonl does not exist"):
        load_user_splits(file_task(tmp_path / "nothere.jsonl"), None)


@pytest.mark.parametrize(
    ("method", "key"),
    [(["method.name=sft"], "method.name"), (["method.lmbda=0.5"], "method.lmbda")],
)
def test_a_prompt_only_file_refuses_methods_that_need_completions(
    tmp_path, student_model_dir, backend, method, key
):
    path = write(tmp_path / "prompts.jsonl", rows_of("prompt"))
    config = small_config(
        tmp_path / "run", student_model_dir, "task.name=file", f"task.train_file={path}", *method
    )
    with pytest.raises(
        ConfigError, match=rf"^{key}: .*prompts.jsonl has prompts without completions"
    ):
        Trainer(config, teacher=in_process(backend))
    # on-policy GKD and SeqKD complete the prompts themselves
    for fine in ("method.lmbda=1", "method.name=seqkd"):
        ok = small_config(
            tmp_path, student_model_dir, "task.name=file", f"task.train_file={path}", fine
        )
        assert training_splits(ok.task, ok.method, None).train


def test_a_messages_file_with_one_unanswered_conversation_has_no_completions(
    tmp_path, chat_tokenizer
):
    """Answered conversations keep their replies, the unanswered one is a prompt, and
    the file as a whole cannot train a method that needs every completion (sft), only
    one that completes the prompts itself (on-policy GKD)."""
    rows = rows_of("messages")[:3] + rows_of("messages_prompt")[3:]
    path = write(tmp_path / "chat.jsonl", rows)
    splits = load_user_splits(file_task(path), chat_tokenizer)
    assert splits.train == [
        *expected_examples("messages", chat_tokenizer)[:3],
        *expected_examples("messages_prompt", chat_tokenizer)[3:],
    ]
    assert not splits.has_completions
    with pytest.raises(ConfigError, match=r"^method.name: .*chat.jsonl has prompts without"):
        require_completions(MethodConfig(name="sft"), file_task(path), splits)
    require_completions(MethodConfig(name="gkd", lmbda=1.0), file_task(path), splits)


METRIC_MODULE = """
CALLS = []


def score(predictions, references):
    CALLS.append((list(predictions), list(references)))
    return {"words": sum(len(p.split()) for p in predictions) / len(predictions), "one": 1}
"""


def test_a_few_steps_on_a_jsonl_of_prompts_train_and_evaluate_with_a_custom_metric(
    tmp_path, student_model_dir, backend, monkeypatch
):
    (tmp_path / "prompt_metrics.py").write_text(METRIC_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ["Ada", "Ben", "Cleo", "Dara", "Emil"]
    rows = [{"prompt": f"{a} has {n} coins, so {a} has"} for a in names for n in range(4)]
    path = write(tmp_path / "prompts.jsonl", rows)
    config = small_config(
        tmp_path / "run",
        student_model_dir,
        "task.name=file",
        f"task.train_file={path}",
        "task.validation_fraction=0.2",
        "task.metric=prompt_metrics:score",
        "optim.steps=3",
        "run.eval_size=4",
    )
    result = train(config, teacher=in_process(backend))
    assert result.steps == 3 and len(result.losses) == 3
    final = result.evaluations[-1]
    assert final["step"] == 3
    for key in ("forward_kl", "reverse_kl", "divergence", "words", "one", "sampled_words"):
        assert f"eval/{key}" in final, key
    assert final["eval/metric"] == final["eval/words"] and final["eval/one"] == 1.0
    import prompt_metrics

    predictions, references = prompt_metrics.CALLS[-1]
    assert len(predictions) == 4 and references == [""] * 4  # prompt-only: no references


def test_supervised_steps_on_chat_messages_train_on_the_rendered_reply(
    tmp_path, student_model_dir, backend, monkeypatch
):
    """lmbda=0 trains on the dataset's replies: the chat-rendered prompt once encoded
    (one <bos>), the reply the template writes after it, and the metric's references are
    the replies as the student would print them."""
    student = Path(shutil.copytree(student_model_dir, tmp_path / "chat-student"))
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(student)
    (tmp_path / "chat_metrics.py").write_text(METRIC_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    train_path = write(tmp_path / "train.jsonl", rows_of("messages"))
    held_path = write(tmp_path / "held.jsonl", rows_of("messages")[:2])
    config = small_config(
        tmp_path / "run",
        student,
        "task.name=file",
        f"task.train_file={train_path}",
        f"task.validation_file={held_path}",
        "task.metric=chat_metrics:score",
        "method.lmbda=0",
        "optim.steps=2",
        "run.eval_size=2",
    )
    trainer = Trainer(config, teacher=in_process(backend))
    try:
        record = trainer.train_step()
        examples = trainer.state.stream.examples
        assert all(e.templated for e in examples)
        batch = trainer.builder.build(examples[:1], on_policy=False, step=0, index=0)
        expected = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": REPLIES[0]}],
            tokenize=False,
        )
        assert (
            batch.batch.sequences[0] == tokenizer(expected, add_special_tokens=False)["input_ids"]
        )
        assert record["tokens"] > 0 and not record["on_policy"]
        scores = trainer.evaluate()
    finally:
        trainer.close()
    import chat_metrics

    assert {"words", "sampled_words", "forward_kl"} <= set(scores)
    _, references = chat_metrics.CALLS[-1]
    assert references == REPLIES[:2]
