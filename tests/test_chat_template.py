"""The built-in tokenizers' chat template: every committed tokenizer and every tokenizer the
project builds carries it, it renders within the vocabulary, and a one-turn conversation
is its plain prompt; examples/records-chat.jsonl is examples/records-prompts.jsonl as chat."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from student_trainer.chat_template import CHAT_TEMPLATE
from student_trainer.config import load_config
from student_trainer.data import prompt_ids
from student_trainer.tasks import TASKS
from student_trainer.user_data import load_user_splits

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "models").glob("*/*/tokenizer_config.json"))
TOKENIZERS = sorted((ROOT / "models").glob("*/tokenizer"))


def ids_of(rendered) -> list[int]:
    """apply_chat_template(tokenize=True)'s ids (a list, or a BatchEncoding's input_ids)."""
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def test_every_committed_tokenizer_config_holds_the_template():
    assert len(CONFIGS) == 11  # 8 models and 3 tokenizer directories
    for path in CONFIGS:
        assert json.loads(path.read_text())["chat_template"] == CHAT_TEMPLATE, path
        assert not (path.parent / "chat_template.jinja").exists(), path


def test_a_built_tokenizer_is_saved_with_the_template_in_its_config(tiny_model_dir):
    """build_tiny_model trains its tokenizer with train_tokenizer, as pretrain does."""
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert AutoTokenizer.from_pretrained(tiny_model_dir).chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("tokenizer_dir", TOKENIZERS, ids=lambda p: p.parent.name)
def test_one_user_turn_renders_as_the_plain_prompt(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt = TASKS[tokenizer_dir.parent.name].make_example(random.Random(0)).prompt
    chat = [{"role": "user", "content": prompt}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert ids_of(rendered) == tokenizer(prompt)["input_ids"]


@pytest.mark.parametrize("tokenizer_dir", TOKENIZERS, ids=lambda p: p.parent.name)
def test_a_conversation_renders_its_turns_within_the_vocabulary(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Number: 42\nGerman:"},
        {"role": "assistant", "content": " zweiundvierzig"},
        {"role": "user", "content": "Number: 7\nGerman:"},
    ]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<bos>Answer briefly.\nNumber: 42\nGerman: zweiundvierzig<eos>Number: 7\nGerman:"
    ids = ids_of(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True))
    assert max(ids) < len(tokenizer)
    assert tokenizer.decode(ids) == text  # every character encoded, nothing lost
    assert ids.count(tokenizer.eos_token_id) == 1 and ids.count(tokenizer.bos_token_id) == 1


def test_the_chat_example_is_the_prompt_example_as_conversations():
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models/records/student-medium")
    splits = {}
    for name in ("records-prompts", "records-chat"):
        path = ROOT / "examples" / f"{name}.jsonl"
        settings = ["teacher.address=unused:1", "task.name=file", f"task.train_file={path}"]
        task = load_config(None, settings).task
        splits[name] = load_user_splits(task, tokenizer)
    plain, chat = splits["records-prompts"], splits["records-chat"]
    assert not chat.has_completions and len(chat.train) == len(plain.train) == 48
    assert all(e.templated and e.answer == "" for e in chat.train)
    assert [prompt_ids(tokenizer, e) for e in chat.train] == [
        prompt_ids(tokenizer, e) for e in plain.train
    ]
