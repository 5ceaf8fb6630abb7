"""Evaluation loads just a model: any model directory, a run's checkpoint, or the teacher."""

from __future__ import annotations

import pytest

from student_trainer.checkpoint import latest_checkpoint
from student_trainer.evaluate import evaluate_model, evaluate_split
from student_trainer.train import Trainer, train
from tests.trainer_helpers import in_process, small_config


def test_a_model_scored_by_itself_has_no_divergence(tmp_path, tiny_model_dir, backend):
    config = small_config(tmp_path, tiny_model_dir)
    scores = evaluate_model(tiny_model_dir, config, size=4, teacher=in_process(backend))
    assert {"metric", "sampled_metric", "forward_kl", "reverse_kl", "divergence"} <= set(scores)
    for key in ("forward_kl", "reverse_kl", "divergence"):
        assert scores[key] == pytest.approx(0.0, abs=1e-5), key
    assert "forward_kl" not in evaluate_model(tiny_model_dir, config, size=4)  # no teacher


def test_a_checkpoint_scores_as_the_trainer_that_wrote_it_does(
    tmp_path, student_model_dir, tiny_model_dir
):
    overrides = ("optim.steps=2", "run.eval_size=4", f"teacher.in_process={tiny_model_dir}")
    config = small_config(tmp_path, student_model_dir, *overrides)
    train(config)
    checkpoint = latest_checkpoint(tmp_path)
    trainer = Trainer(config, resume=str(checkpoint))
    try:
        expected = trainer.evaluate("test")
    finally:
        trainer.close()
    assert evaluate_split(config, "test", checkpoint=checkpoint, size=4) == expected
    assert set(expected) >= {"metric", "forward_kl", "reverse_kl"}
