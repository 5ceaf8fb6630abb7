"""Checkpoints: only complete ones count, old ones are pruned, a crashed run's tail is redone."""

from __future__ import annotations

import json
import shutil

import torch

from student_trainer.checkpoint import STATE_FILE, checkpoint_dirs, latest_checkpoint
from student_trainer.train import train
from tests.trainer_helpers import in_process, small_config


def test_partial_and_incomplete_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".partial-step-00000009-123").mkdir(parents=True)  # killed mid-write
    (root / "step-00000008").mkdir()  # no trainer_state.pt
    (root / "step-00000002").mkdir()
    (root / "step-00000002" / "trainer_state.pt").write_bytes(b"x")
    (root / "step-00000010").mkdir()
    (root / "step-00000010" / "trainer_state.pt").write_bytes(b"x")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000002", "step-00000010"]
    assert latest_checkpoint(tmp_path).name == "step-00000010"
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_crash_after_the_last_checkpoint_redoes_the_lost_steps(
    tmp_path, student_model_dir, backend
):
    config = small_config(
        tmp_path,
        student_model_dir,
        "optim.steps=5",
        "run.save_every=2",
        "run.keep_checkpoints=2",
        "method.lmbda=0.5",
    )
    straight = train(
        small_config(tmp_path / "straight", student_model_dir, "optim.steps=5", "method.lmbda=0.5"),
        teacher=in_process(backend),
    )
    train(config, teacher=in_process(backend), stop_after=3)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000002", "step-00000003"]
    shutil.rmtree(latest_checkpoint(tmp_path))  # as if the run died after logging step 3
    resumed = train(config, teacher=in_process(backend), resume="auto")
    assert resumed.losses == straight.losses[2:]  # steps 3, 4, 5 again, identically
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in records if "loss" in r] == straight.losses
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000004", "step-00000005"]


def test_a_checkpoint_with_one_sampling_stream_still_resumes_exactly(
    tmp_path, student_model_dir, backend
):
    """Checkpoints from before per-rank streams kept one, as "rollout_generator" (and had no
    steps built ahead)."""
    overrides = ("optim.steps=4", "method.lmbda=1")  # on-policy: every step samples
    straight = train(
        small_config(tmp_path / "straight", student_model_dir, *overrides),
        teacher=in_process(backend),
    )
    config = small_config(tmp_path / "old", student_model_dir, *overrides)
    train(config, teacher=in_process(backend), stop_after=2)
    path = latest_checkpoint(tmp_path / "old") / STATE_FILE
    state = torch.load(path, weights_only=False)
    assert set(state) == {
        "step", "optimizer", "scheduler", "rollout_generators", "mixing", "data",
        "torch", "python", "numpy", "cuda", "config", "pending_rollouts",
    }  # fmt: skip
    assert state.pop("pending_rollouts") == [[]]  # one rank, nothing built ahead
    state["rollout_generator"] = state.pop("rollout_generators")[0]
    torch.save(state, path)
    resumed = train(config, teacher=in_process(backend), resume="auto")
    assert resumed.losses == straight.losses[2:]


def test_a_fresh_run_in_a_used_directory_starts_a_fresh_log(tmp_path):
    """Only a resumed run keeps earlier records; a new run must not inherit step 0's."""
    from student_trainer.metrics import MetricsLog

    first = MetricsLog(tmp_path, 0)
    first.write({"step": 0, "eval/metric": 1.0})
    first.write({"step": 1, "loss": 2.0})
    first.close()
    resumed = MetricsLog(tmp_path, 1)
    resumed.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    fresh = MetricsLog(tmp_path, 0)
    fresh.write({"step": 0, "eval/metric": 3.0})
    fresh.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 0, "eval/metric": 3.0}]
