"""The training loop: Algorithm 1's mixing, SeqKD, normalisation, resume, a live run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import student_trainer.microbatch as microbatch_module
from distill_lab.tiny_model import TinyModelSpec, build_tiny_model
from student_trainer.checkpoint import latest_checkpoint
from student_trainer.config import ConfigError
from student_trainer.train import Trainer, train
from tests.trainer_helpers import SpyTeacher, in_process, small_config


@pytest.fixture
def teacher(backend):
    return SpyTeacher(in_process(backend))


@pytest.fixture
def count_rollouts(monkeypatch):
    """Count the student's sampling calls made by the loop."""
    calls = []
    real = microbatch_module.sample_completions

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(microbatch_module, "sample_completions", counting)
    return calls


def test_on_policy_fraction_matches_lambda(tmp_path, student_model_dir, teacher, count_rollouts):
    steps, lmbda = 240, 0.3
    config = small_config(
        tmp_path,
        student_model_dir,
        f"method.lmbda={lmbda}",
        "optim.batch_size=1",
        "rollout.max_new_tokens=2",
    )
    trainer = Trainer(config, teacher=teacher)
    records = [trainer.train_step() for _ in range(steps)]
    trainer.close()
    on_policy = sum(r["on_policy"] for r in records)
    sigma = math.sqrt(steps * lmbda * (1 - lmbda))
    assert abs(on_policy - steps * lmbda) < 3.5 * sigma
    assert len(count_rollouts) == on_policy  # student samples exactly on on-policy steps
    assert teacher.calls["score"] == steps and teacher.calls["generate"] == 0


def test_lambda_zero_never_samples(tmp_path, student_model_dir, teacher, count_rollouts):
    config = small_config(tmp_path, student_model_dir, "method.lmbda=0", "optim.grad_accum=2")
    result = train(config, teacher=teacher)
    assert count_rollouts == [] and teacher.calls["generate"] == 0
    assert teacher.calls["score"] == 4 * 2  # one call per micro-batch
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["on_policy"] for r in records if "loss" in r] == [False] * 4
    assert len(result.losses) == 4


def test_seqkd_trains_on_the_teachers_generate(tmp_path, student_model_dir, teacher, monkeypatch):
    seen = []
    real = microbatch_module.build_batch
    monkeypatch.setattr(
        microbatch_module, "build_batch", lambda p, c, **kw: seen.append(c) or real(p, c, **kw)
    )
    config = small_config(tmp_path, student_model_dir, "method.name=seqkd")
    train(config, teacher=teacher)
    assert teacher.calls["generate"] == 4 and teacher.calls["score"] == 0
    assert seen == teacher.generated  # the sequences trained on are the teacher's outputs


def one_step_loss(tmp_path, student_dir, backend, *overrides) -> float:
    config = small_config(tmp_path, student_dir, "method.lmbda=0", *overrides)
    trainer = Trainer(config, teacher=in_process(backend))
    loss = trainer.train_step()["loss"]
    trainer.close()
    return loss


def test_accumulation_normalises_by_the_whole_step(tmp_path, student_model_dir, backend):
    """2 micro-batches of 2 give the loss of 1 batch of 4 (the same examples, token mean)."""
    whole = one_step_loss(tmp_path / "a", student_model_dir, backend, "optim.batch_size=4")
    split = one_step_loss(
        tmp_path / "b", student_model_dir, backend, "optim.batch_size=2", "optim.grad_accum=2"
    )
    assert split == pytest.approx(whole, rel=1e-5)


@pytest.mark.parametrize("staleness", [0, 1], ids=["in-step", "built-ahead"])
def test_resume_continues_exactly(tmp_path, student_model_dir, backend, staleness):
    """Stop at N/2, resume: the same losses and weights as the uninterrupted run (with steps
    built ahead, the checkpoint keeps them and the resumed run trains the same ones)."""
    overrides = (
        "method.lmbda=0.5",
        "optim.grad_accum=2",
        "optim.steps=6",
        "method.student_candidates=4",
        "optim.schedule=linear",
        f"rollout.max_staleness={staleness}",
    )
    straight = train(
        small_config(tmp_path / "a", student_model_dir, *overrides),
        teacher=in_process(backend),
    )
    interrupted = small_config(tmp_path / "b", student_model_dir, *overrides)
    first = train(interrupted, teacher=in_process(backend), stop_after=3)
    assert first.steps == 3 and latest_checkpoint(tmp_path / "b").name == "step-00000003"
    second = train(interrupted, teacher=in_process(backend), resume="auto")
    assert first.losses + second.losses == straight.losses
    a = AutoModelForCausalLM.from_pretrained(latest_checkpoint(tmp_path / "a"))
    b = AutoModelForCausalLM.from_pretrained(latest_checkpoint(tmp_path / "b"))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    logged = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()]
    assert [r["loss"] for r in logged if "loss" in r] == straight.losses


def test_live_service_run_brings_the_student_closer(tmp_path, student_model_dir, server):
    """End to end over gRPC: the held-out divergence to the teacher goes down."""
    config = small_config(
        tmp_path,
        student_model_dir,
        f"teacher.address={server.address}",
        "optim.steps=30",
        "optim.grad_accum=2",
        "run.eval_size=16",
        "rollout.max_new_tokens=10",
    )
    result = train(config)
    before, after = result.evaluations[0], result.evaluations[-1]
    assert (before["step"], after["step"]) == (0, 30)
    for key in ("eval/divergence", "eval/forward_kl", "eval/reverse_kl"):
        assert after[key] < 0.9 * before[key], key
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    steps = [r for r in steps if "loss" in r]
    assert len(steps) == 30
    assert all(r["teacher_latency_s"] > 0 and 0 <= r["hidden_fraction"] <= 1 for r in steps)


@pytest.mark.parametrize(
    "overrides",
    [
        ("method.loss=sampled_rkl",),
        ("method.loss=forward_kl", "method.loss_args.support=full"),
        ("method.alpha=0.5", "method.samples_per_prompt=2"),
        ("method.name=sft",),
    ],
)
def test_every_objective_trains(tmp_path, student_model_dir, backend, overrides):
    config = small_config(tmp_path, student_model_dir, "optim.steps=3", *overrides)
    result = train(config, teacher=in_process(backend))
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    if "method.alpha=0.5" in overrides:
        assert all(0 <= r["reward"] <= 1 for r in records if "loss" in r)


def test_teacher_with_another_vocabulary_is_refused(tmp_path, backend):
    other = build_tiny_model(
        tmp_path / "other",
        TinyModelSpec(
            vocab_size=300,
            hidden_size=16,
            intermediate_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
        ),
    )
    config = small_config(tmp_path, other)
    with pytest.raises(ConfigError, match=r"^teacher\.address: .*vocabulary size"):
        Trainer(config, teacher=in_process(backend))


def test_unreachable_service_is_named(tmp_path, student_model_dir):
    from teacher_service.cli import free_port

    address = f"127.0.0.1:{free_port()}"
    config = small_config(
        tmp_path, student_model_dir, f"teacher.address={address}", "teacher.connect_timeout_s=1"
    )
    with pytest.raises(ConfigError, match=rf"^teacher\.address: no teacher service .*{address}"):
        Trainer(config)


def test_top_k_beyond_the_teachers_vocabulary_is_named(tmp_path, student_model_dir, backend):
    config = small_config(tmp_path, student_model_dir, "method.top_k=100000")
    with pytest.raises(ConfigError, match=r"^method\.top_k: 100000 exceeds"):
        Trainer(config, teacher=in_process(backend))
