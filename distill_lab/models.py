"""The built-in tasks' models: a BPE tokenizer per task, and a Llama teacher and student
trained from scratch by SFT (`student-trainer pretrain`, `make models`).

Each model directory is self-contained (config, safetensors weights, tokenizer) and loads
through from_pretrained exactly as a user's own checkpoint does. The student starts from
the same tokenizer as its teacher, as distillation on token log-probs requires.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from distill_lab.tiny_model import TinyModelSpec, build_tiny_model, train_tokenizer
from student_trainer.chat_template import save_tokenizer
from student_trainer.checkpoint import latest_checkpoint
from student_trainer.config import ConfigError, load_config
from student_trainer.tasks import TASKS

MODELS_DIR = Path("models")
CONFIGS_DIR = Path("configs/pretrain")

# Byte-level BPE sizes: small enough that a German number word is ~10 tokens, so one
# early wrong token has a long continuation to derail (the exposure bias GKD targets).
TOKENIZER_VOCAB = {"translation": 352, "arithmetic": 512, "records": 512}
TOKENIZER_CORPUS = 20_000  # generated examples (own seed) the BPE merges are learned on


def _llama(hidden: int, intermediate: int, layers: int, heads: int, seed: int) -> TinyModelSpec:
    return TinyModelSpec(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        max_seq_len=256,
        init_std=0.02,
        seed=seed,
    )


# 1.92M and 37k parameters with translation's 384-row embedding: the student is 1/52.
ARCHITECTURES = {"teacher": _llama(192, 512, 4, 4, seed=0), "student": _llama(32, 88, 1, 2, seed=1)}
# records (576-row embedding): a 1.99M teacher and a width sweep of 2-layer students, 62k,
# 111k and 174k parameters (1/32, 1/18, 1/11 of it). Two layers, because copying a venue
# name from the record takes two (1-layer students stall near 30%); wider 2-layer students
# match the teacher under greedy decoding after 1,000 SFT steps (540k: 99.5%).
RECORDS_ARCHITECTURES = {
    "teacher": ARCHITECTURES["teacher"],
    "student-small": _llama(32, 88, 2, 2, seed=1),
    "student-medium": _llama(48, 128, 2, 4, seed=2),
    "student-large": _llama(64, 176, 2, 4, seed=3),
}


def architectures(task: str) -> dict[str, TinyModelSpec]:
    """Role -> model spec of a built-in task's models."""
    return RECORDS_ARCHITECTURES if task == "records" else ARCHITECTURES


def model_dir(task: str, role: str, root: Path = MODELS_DIR) -> Path:
    return root / task / role


def build_tokenizer(task: str, out_dir: Path) -> PreTrainedTokenizerFast:
    """The task's BPE tokenizer, learned on text from the task's own generator."""
    rng = random.Random(f"{task}:tokenizer")
    make = TASKS[task].make_example
    corpus = [e.prompt + e.answer for e in (make(rng) for _ in range(TOKENIZER_CORPUS))]
    tokenizer = train_tokenizer(TOKENIZER_VOCAB[task], seed=0, corpus=corpus)
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


def parameter_count(path: Path) -> int:
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return sum(p.numel() for p in model.parameters())


def pretrain(
    task: str,
    role: str,
    *,
    root: Path = MODELS_DIR,
    overrides: list[str] = (),
    runs_dir: Path = Path("runs/pretrain"),
) -> Path:
    """Train `role` for `task` from random weights by SFT; write root/task/role.

    The run (metrics.jsonl, checkpoints) lives in runs_dir/task-role; the result is the
    final checkpoint's model and tokenizer, plus pretrain.json (steps, parameters).
    """
    if task not in TASKS or task not in TOKENIZER_VOCAB:
        raise ConfigError(f"task.name: {task!r} has no built-in models ({list(TOKENIZER_VOCAB)})")
    roles = architectures(task)
    if role not in roles:
        raise ConfigError(f"role: {role!r} is not one of {list(roles)} for task {task!r}")
    config_path = CONFIGS_DIR / f"{task}-{role}.yaml"
    run_dir = runs_dir / f"{task}-{role}"
    tokenizer_dir = root / task / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        build_tokenizer(task, tokenizer_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    init = build_tiny_model(run_dir / "init", roles[role], tokenizer_from=tokenizer_dir)
    config = load_config(
        config_path,
        [f"student.model={init}", f"run.out_dir={run_dir}", f"task.name={task}", *overrides],
    )
    if config.method.name != "sft":
        raise ConfigError(f"method.name: {config_path} must train by sft, not {config.method.name}")
    from student_trainer.train import train  # the heavy import only when training

    result = train(config)
    final = latest_checkpoint(run_dir)
    out = model_dir(task, role, root)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in final.iterdir():
        if name.name != "trainer_state.pt":
            shutil.copy2(name, out / name.name)
    summary = {
        "task": task,
        "role": role,
        "parameters": parameter_count(out),
        "steps": result.steps,
        "config": str(config_path),
        "validation": result.evaluations[-1],
    }
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out
