"""`student-trainer` as users run it: a YAML file, --set overrides, resume, eval, bad keys,
and the tiny random models for tests and smoke runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from student_trainer.checkpoint import checkpoint_dirs, latest_checkpoint


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "student_trainer", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=None if env is None else {**os.environ, **env},
    )


def test_train_resume_and_eval(tmp_path, tiny_model_dir, student_model_dir):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"student:\n  model: {student_model_dir}\n"
        f"teacher:\n  in_process: {tiny_model_dir}\n"
        "task:\n  train_size: 32\n"
        "optim:\n  steps: 2\n  batch_size: 2\n"
        "rollout:\n  max_new_tokens: 4\n"
        f"run:\n  out_dir: {tmp_path / 'run'}\n  eval_size: 4\n  save_every: 1\n"
        "  keep_checkpoints: 1\n  progress: false\n"
    )
    done = run_cli("train", "--config", str(config), "--set", "method.loss_args.beta=0.9")
    assert done.returncode == 0, done.stderr
    assert "trained to step 2" in done.stdout
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-00000002"]
    # the checkpoint is a plain save_pretrained directory
    AutoModelForCausalLM.from_pretrained(checkpoint)
    assert len(AutoTokenizer.from_pretrained(checkpoint)) == len(
        AutoTokenizer.from_pretrained(student_model_dir)
    )
    saved = json.loads((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method"]["loss_args"] == {"beta": 0.9}

    more = run_cli("train", "--config", str(config), "--set", "optim.steps=3", "--resume", "auto")
    assert more.returncode == 0, more.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]

    evaluated = run_cli(
        "eval",
        "--config",
        str(config),
        "--checkpoint",
        str(latest_checkpoint(tmp_path / "run")),
        "--split",
        "test",
    )
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["step"] == 3 and result["split"] == "test"
    assert result["prompts"] == 4  # run.eval_size of the test split's 64 prompts
    assert {"metric", "forward_kl", "reverse_kl", "divergence"} <= result.keys()


def test_bad_key_exits_2_naming_it(tmp_path):
    done = run_cli("train", "--set", "method.bta=0.5")
    assert done.returncode == 2
    assert "method.bta: unknown key" in done.stderr
    done = run_cli("train", "--set", "method.lmbda=2")
    assert done.returncode == 2 and "method.lmbda: 2.0 is outside [0, 1]" in done.stderr


def test_threads_come_from_the_flag_over_the_environment_and_bad_counts_exit_2(tmp_path):
    """Every command sizes torch's threads first (causal_lm/threads.py), and says so."""
    threads = {"TEACHER_THREADS": "1"}
    done = run_cli("--log-level", "INFO", "tiny-model", str(tmp_path / "a"), env=threads)
    assert done.returncode == 0, done.stderr
    assert "threads: 1 (torch intra-op and inter-op, tokenizers): TEACHER_THREADS=1" in done.stderr
    flag = ("--log-level", "INFO", "tiny-model", str(tmp_path / "b"), "--threads", "2")
    done = run_cli(*flag, env=threads)
    assert "threads: 2 (torch intra-op and inter-op, tokenizers): --threads 2" in done.stderr
    done = run_cli("train", env={"TEACHER_THREADS": "many"})
    assert done.returncode == 2
    assert "config error: TEACHER_THREADS must be a whole number" in done.stderr


def test_missing_student_model_is_named(tmp_path):
    done = run_cli(
        "train", "--set", f"student.model={tmp_path / 'nope'}", "--set", "method.name=sft"
    )
    assert done.returncode == 2 and "student.model:" in done.stderr


def test_pretrain_names_the_roles_a_task_has(tmp_path):
    done = run_cli("pretrain", "--task", "records", "--role", "student", "--models-dir", tmp_path)
    assert done.returncode == 2
    assert "role: 'student' is not one of ['teacher', 'student-small'" in done.stderr


def test_tiny_model_command_writes_a_model_that_from_pretrained_loads(tmp_path):
    out = tmp_path / "model"
    done = run_cli(
        "tiny-model", str(out), "--hidden-size", "32", "--num-layers", "1", "--vocab-size", "300"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote a tiny Llama model and its BPE tokenizer to {out}"
    assert (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert config["model_type"] == "llama" and config["hidden_size"] == 32
    assert config["vocab_size"] > len(tokenizer) == 300  # padded embedding rows
    ids = tokenizer("Ada has 3 coins.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Ada has 3 coins."
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), config["vocab_size"])
