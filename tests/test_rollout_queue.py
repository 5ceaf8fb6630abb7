"""Steps built ahead (rollout.max_staleness = k): step s samples with the weights of step
max(0, s - k), exactly; nothing else about the run changes; resume stays exact."""

from __future__ import annotations

import pytest
import torch

import student_trainer.microbatch as microbatch_module
from student_trainer.config import ConfigError
from student_trainer.train import Trainer, train
from tests.trainer_helpers import in_process, small_config


@pytest.fixture
def sampled_with(monkeypatch):
    """The weights each sampling call used (a copy), in the order the calls were made."""
    weights: list[dict[str, torch.Tensor]] = []
    real = microbatch_module.sample_completions

    def recording(model, *args, **kwargs):
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(microbatch_module, "sample_completions", recording)
    return weights


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_every_step_samples_with_the_weights_trained_k_steps_before(
    tmp_path, student_model_dir, backend, sampled_with, staleness
):
    config = small_config(
        tmp_path, student_model_dir, "optim.steps=5", f"rollout.max_staleness={staleness}"
    )
    trainer = Trainer(config, teacher=in_process(backend))
    at_start, used = [], []
    try:
        for _ in range(config.optim.steps):
            at_start.append({k: v.clone() for k, v in trainer.student.model.state_dict().items()})
            used.append(trainer.train_step()["staleness"])
    finally:
        trainer.close()
    assert used == [min(step, staleness) for step in range(config.optim.steps)]
    # steps up to 4 + k were built (the last k ahead of a step that never came)
    assert len(sampled_with) == config.optim.steps + staleness
    for step in range(config.optim.steps):
        expected = at_start[max(0, step - staleness)]
        for name, value in sampled_with[step].items():
            assert torch.equal(value, expected[name]), (step, name)
    # and the weights did move, so the check above tells the versions apart
    assert not torch.equal(at_start[0]["lm_head.weight"], at_start[-1]["lm_head.weight"])


@pytest.mark.parametrize("staleness", [1, 2])
def test_with_weights_that_never_move_building_ahead_changes_nothing(
    tmp_path, student_model_dir, backend, staleness
):
    """The same coin, examples and samples in the same order: the same losses, bit for bit."""
    frozen = ("optim.lr=1e-30", "method.lmbda=0.5", "optim.grad_accum=2", "optim.steps=4")
    runs = [
        train(
            small_config(
                tmp_path / str(k), student_model_dir, *frozen, f"rollout.max_staleness={k}"
            ),
            teacher=in_process(backend),
        )
        for k in (0, staleness)
    ]
    assert runs[0].losses == runs[1].losses


def test_policy_gradient_estimators_refuse_stale_samples(tmp_path, student_model_dir):
    for overrides in (
        ("method.loss=sampled_rkl",),
        ("method.alpha=0.5",),
    ):
        with pytest.raises(ConfigError, match=r"rollout\.max_staleness"):
            small_config(tmp_path, student_model_dir, *overrides, "rollout.max_staleness=1")
