"""Distil on your own data (task.name=file): local files in TRL's dataset formats.

On-policy distillation needs only prompts: the student completes them and the teacher
scores the completions. So a file of prompts is enough; prompt/completion pairs also
allow the methods that train on the dataset's outputs (SFT, supervised and mixed GKD).

Files: JSONL, JSON, Parquet, CSV, or a directory written by `datasets`' save_to_disk,
loaded with the `datasets` library. Formats (TRL's, task.format=auto tells them apart by
their columns; other columns are ignored):

- prompt-only: `prompt`, a string or a list of chat messages;
- prompt/completion: `prompt` + `completion`, both strings or both message lists;
- conversational: `messages`, a list of {"role", "content"}: ending in the assistant's
  reply, that reply is the completion and everything before it the prompt; ending in any
  other turn (the user's), the whole list is a prompt, as TRL's conversational prompts are.

Conversations are rendered with the student tokenizer's chat template, the prompt with
add_generation_prompt=True; a completion is what the template adds after that prompt.
The rendered prompt carries the template's special tokens, so the Example says so
(`templated`) and is encoded without a second <bos> (data.prompt_ids).

Every record is checked before training starts; a bad one stops the run with an error
naming the file, the record (JSONL and CSV: its line; JSON arrays: its index; Parquet and
save_to_disk directories: its row index) and the field.
"""

from __future__ import annotations

import csv
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from student_trainer.config import FILE_TASK, ConfigError, MethodConfig, TaskConfig
from student_trainer.tasks import Example, Splits

ROLES = ("system", "developer", "user", "assistant", "tool")
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ConfigError):
    """A bad data file or record: the message names the file, the record and the field."""


@dataclass(frozen=True)
class Records:
    """A file's rows as Python values, and where each row sits in the file (for errors)."""

    path: Path
    rows: list[dict[str, Any]]
    columns: list[str]
    where: Callable[[int], str]  # row index -> "data/train.jsonl line 17"


@dataclass(frozen=True)
class UserData:
    """One file's examples, and whether they carry completions (prompt-only: no)."""

    path: Path
    format: str
    examples: list[Example]
    has_completions: bool


# -- reading files -------------------------------------------------------------------------
def read_records(path_text: str, key: str) -> Records:
    """The file (or save_to_disk directory) at `path_text`, named by config key `key`."""
    path = Path(path_text)
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: no records (the file is empty)")
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    progress = not are_progress_bars_disabled()
    disable_progress_bars()  # reading a file: no bars between the run's own lines
    # datasets logs its own parse failures; ours (below) name the line and field instead
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        if path.is_dir():
            dataset = _load_directory(path, key)
            where = _row_locator(path, "row")
        else:
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ConfigError(
                    f"{key}: {path}: unknown file type (expected .jsonl, .json, .parquet, .csv "
                    "or a directory written by datasets' save_to_disk)"
                )
            dataset = _load_file(path, builder)
            where = _locator(path, builder, len(dataset))
    finally:
        log.setLevel(level)
        if progress:
            enable_progress_bars()
    if len(dataset) == 0:
        raise DataError(f"{path}: no records")
    return Records(path, dataset.to_list(), list(dataset.column_names), where)


def _load_directory(path: Path, key: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise ConfigError(
            f"{key}: {path} is a directory but not one datasets' save_to_disk wrote ({error})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        raise ConfigError(
            f"{key}: {path} holds several splits ({', '.join(loaded)}): name one split's "
            f"directory, e.g. {path / next(iter(loaded))}"
        )
    return loaded


def _load_file(path: Path, builder: str) -> Any:
    import datasets

    options: dict[str, Any] = {}
    if builder == "csv":
        # every column a string, as written: "42" stays "42", an empty cell is "", and
        # "NA" or "null" are text, not missing values
        columns = _csv_header(path)
        options = dict(
            features=datasets.Features({c: datasets.Value("string") for c in columns}),
            keep_default_na=False,
            na_filter=False,
        )
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as error:  # datasets and pyarrow raise many kinds for unreadable input
        if builder == "json":
            _diagnose_json(path)  # names the bad line when it can find it
        raise DataError(f"{path}: cannot be read as {builder}: {error}") from error


def _csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise DataError(f"{path}: no header line (a CSV file needs one naming its columns)")
    return header


def _locator(path: Path, builder: str, count: int) -> Callable[[int], str]:
    """Row index -> place in the file: lines for JSONL and CSV (as an editor numbers
    them), the index for JSON arrays and Parquet (as Python would index them)."""
    if builder == "parquet":
        return _row_locator(path, "row")
    if builder == "csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            next(reader, None)
            lines = [reader.line_num for row in reader if row]  # the line each record ends on
    elif _is_json_array(path):
        return _row_locator(path, "record")
    else:
        with path.open("rb") as handle:
            lines = [number for number, line in enumerate(handle, 1) if line.strip()]
    if len(lines) != count:  # the reader skipped something we did not: fall back to indexes
        return _row_locator(path, "row")
    return lambda index: f"{path} line {lines[index]}"


def _row_locator(path: Path, word: str) -> Callable[[int], str]:
    return lambda index: f"{path} {word} {index}"


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as handle:
        start = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return start.startswith(b"[")


def _diagnose_json(path: Path) -> None:
    """Find the line `datasets` could not read: invalid JSON, or a field whose type
    differs from a string (or, for messages, a list). Returns when nothing is found."""
    import json

    if _is_json_array(path):
        return
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line.strip())
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{where}: not valid JSON ({error.msg}, at column {error.pos + 1})"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {_kind(record)}")
            for field in ("prompt", "completion"):
                if field in record and not isinstance(record[field], (str, list)):
                    raise DataError(
                        f'{where}: "{field}": expected a string or a list of messages, '
                        f"got {_kind(record[field])}"
                    )
            if "messages" in record and not isinstance(record["messages"], list):
                raise DataError(
                    f'{where}: "messages": expected a list of messages, '
                    f"got {_kind(record['messages'])}"
                )


# -- records to examples -------------------------------------------------------------------
def detect_format(records: Records, wanted: str) -> str:
    """task.format, or with auto the format the columns say (messages, then prompt)."""
    columns = set(records.columns)
    listed = ", ".join(records.columns)
    if wanted == "auto":
        if "messages" in columns:
            return "messages"
        if "prompt" in columns:
            return "prompt_completion" if "completion" in columns else "prompt"
        raise DataError(
            f'{records.path}: no "prompt" or "messages" column (columns: {listed}); TRL\'s '
            'formats are "prompt", "prompt" + "completion", or "messages"'
        )
    needed = {"prompt": ["prompt"], "prompt_completion": ["prompt", "completion"]}
    for column in needed.get(wanted, ["messages"]):
        if column not in columns:
            raise DataError(
                f'{records.path}: no "{column}" column, which task.format={wanted} needs '
                f"(columns: {listed})"
            )
    return wanted


def to_examples(records: Records, format: str, tokenizer: Any) -> list[Example]:
    """Every record as an Example, checked; the first bad one raises a DataError."""
    return [
        _example(row, format, tokenizer, records.where(index))
        for index, row in enumerate(records.rows)
    ]


def _example(row: dict[str, Any], format: str, tokenizer: Any, where: str) -> Example:
    if format == "messages":
        messages = _messages(row["messages"], "messages", where)
        if not _ends_in_reply(messages):
            return _render(tokenizer, messages, None, where, "messages")
        if len(messages) == 1:
            raise DataError(f'{where}: "messages": only the assistant\'s reply, no prompt')
        return _render(tokenizer, messages[:-1], messages[-1:], where, "messages")
    prompt = row["prompt"]
    completion = row.get("completion") if format == "prompt_completion" else None
    if isinstance(prompt, list):  # conversational
        prompt = _messages(prompt, "prompt", where)
        if format == "prompt_completion":
            completion = _messages(completion, "completion", where)
        return _render(tokenizer, prompt, completion, where, "prompt")
    prompt = _text(prompt, "prompt", where)
    if format == "prompt_completion":
        if isinstance(completion, list):
            raise DataError(
                f'{where}: "completion": a list of messages, but "prompt" is a string '
                "(both strings, or both message lists)"
            )
        completion = _text(completion, "completion", where, allow_empty=True)
    return Example(prompt, completion or "")


def _ends_in_reply(messages: list[dict[str, Any]]) -> bool:
    """Whether a conversation's last turn is the assistant's (its completion); else it is
    a prompt, to be completed."""
    return messages[-1]["role"] == "assistant"


def has_completions(records: Records, format: str) -> bool:
    """Whether every record carries a completion: a `messages` file with one conversation
    that ends in a prompt has not (call after to_examples has checked the records)."""
    if format == "messages":
        return all(_ends_in_reply(row["messages"]) for row in records.rows)
    return format != "prompt"


def _text(value: Any, field: str, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f'{where}: "{field}": expected a string, got {_kind(value)}')
    if not allow_empty and not value.strip():
        raise DataError(f'{where}: "{field}": empty')
    return value


def _messages(value: Any, field: str, where: str) -> list[dict[str, Any]]:
    """A checked list of chat messages (keys a columnar file filled with null dropped)."""
    if not isinstance(value, list):
        raise DataError(
            f'{where}: "{field}": expected a list of messages ({{"role", "content"}}), '
            f"got {_kind(value)}"
        )
    if not value:
        raise DataError(f'{where}: "{field}": empty list of messages')
    messages = []
    for index, message in enumerate(value):
        place = f'{where}: "{field}"[{index}]'
        if not isinstance(message, dict):
            raise DataError(
                f'{place}: expected a {{"role", "content"}} object, got {_kind(message)}'
            )
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{place}.role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(
                f"{place}.content: expected a string, got {_kind(message.get('content'))}"
            )
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def _render(
    tokenizer: Any,
    prompt: list[dict[str, Any]],
    completion: list[dict[str, Any]] | None,
    where: str,
    field: str,
) -> Example:
    """Prompt and completion as TRL renders them: the prompt with the generation prompt,
    the completion as the rest of the rendered prompt + completion."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f'{where}: "{field}" is a conversation, and the student\'s tokenizer '
            "(student.model) has no chat template to render it with: give it one "
            "(chat_template in its tokenizer_config.json) or give plain-text prompts"
        )
    try:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if completion is None:
            return Example(text, "", templated=True)
        whole = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    except Exception as error:  # the template's own checks (jinja raise_exception), any kind
        raise DataError(f'{where}: "{field}": the chat template refused it: {error}') from None
    if not whole.startswith(text):
        raise DataError(
            f'{where}: "{field}": the chat template renders prompt + completion other than '
            "the prompt alone (with add_generation_prompt=True), so the completion cannot be "
            "cut from it"
        )
    return Example(text, whole[len(text) :], templated=True)


def _kind(value: Any) -> str:
    """A value's type in JSON's words (what the user wrote in the file)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# -- splits --------------------------------------------------------------------------------
def load_file(path: str, key: str, format: str, tokenizer: Any) -> UserData:
    """One file's examples; the format is task.format's, or detected from its columns."""
    records = read_records(path, key)
    detected = detect_format(records, format)
    examples = to_examples(records, detected, tokenizer)
    return UserData(records.path, detected, examples, has_completions(records, detected))


def held_out_count(total: int, fraction: float) -> int:
    """How many of `total` records task.validation_fraction holds out (at least one)."""
    return max(1, round(total * fraction)) if fraction > 0 else 0


def hold_out(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded random `fraction` of the records held out; both keep
    the file's order. The same seed and file give the same split."""
    count = held_out_count(len(examples), fraction)
    if count >= len(examples):
        raise ConfigError(
            f"task.validation_fraction: {fraction} of {len(examples)} records leaves none "
            "to train on"
        )
    order = list(range(len(examples)))
    random.Random(f"{FILE_TASK}:{seed}").shuffle(order)
    held = set(order[:count])
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]


def load_user_splits(task: TaskConfig, tokenizer: Any) -> Splits:
    """train / validation / test from task.train_file, task.validation_file (or
    task.validation_fraction of the training file) and task.test_file. The sizes
    (task.train_size, ...) do not apply: every record is used."""
    train = load_file(task.train_file, "task.train_file", task.format, tokenizer)
    examples, validation = train.examples, []
    if task.validation_file:
        validation = load_file(
            task.validation_file, "task.validation_file", task.format, tokenizer
        ).examples
    elif task.validation_fraction > 0:
        examples, validation = hold_out(examples, task.validation_fraction, task.seed)
    test = []
    if task.test_file:
        test = load_file(task.test_file, "task.test_file", task.format, tokenizer).examples
    return Splits(examples, validation, test, has_completions=train.has_completions)


def split_size(task: TaskConfig, split: str) -> int:
    """How many records a split of the user's files holds (without rendering them); a
    split with no file and no fraction is refused, naming the key that would give it."""
    if split == "test":
        if not task.test_file:
            raise ConfigError("task.test_file: --split test needs one (none is set)")
        return len(read_records(task.test_file, "task.test_file").rows)
    if not (task.validation_file or task.validation_fraction > 0):
        raise ConfigError(
            "task.validation_file: --split validation needs one, or task.validation_fraction"
        )
    if task.validation_file:
        return len(read_records(task.validation_file, "task.validation_file").rows)
    total = len(read_records(task.train_file, "task.train_file").rows)
    return held_out_count(total, task.validation_fraction)


def require_completions(method: MethodConfig, task: TaskConfig, splits: Splits) -> None:
    """Refuse a method that trains on the dataset's completions when there are none."""
    if splits.has_completions:
        return
    if method.name == "sft":
        key, why = "method.name", "sft trains on the dataset's completions"
    elif method.name == "gkd" and method.lmbda < 1:
        key, why = (
            "method.lmbda",
            f"{method.lmbda} < 1 trains some steps on the dataset's completions",
        )
    elif method.alpha < 1:
        key, why = "method.alpha", "RL + GKD rewards completions against the dataset's"
    else:
        return
    raise ConfigError(
        f"{key}: {why}, and {task.train_file} has prompts without completions: "
        "distil on-policy (method.name=gkd, method.lmbda=1) or by SeqKD (method.name=seqkd), "
        'or give prompt/completion pairs ("prompt" + "completion", or "messages" ending '
        "in the assistant's reply)"
    )
