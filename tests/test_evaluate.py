"""Evaluation loads just a model: any model directory, a run's checkpoint, or the teacher."""

from __future__ import annotations

import pytest

from student_trainer.checkpoint import latest_checkpoint
from student_trainer.evaluate import evaluate_model, evaluate_split
from student_trainer.train import Trainer, train
from tests.trainer_helpers import in_process, small_config


@pytest.mark.parametrize(
    "loss",
    [
        (),
        ("method.loss=jsd", "method.loss_args.support=full"),
        ("method.loss=sampled_rkl",),
        ("method.loss=reverse_kl", "method.student_candidates=4"),
    ],
)
def test_a_model_scored_by_itself_has_no_divergence(tmp_path, tiny_model_dir, backend, loss):
    config = small_config(tmp_path, tiny_model_dir, *loss)
    scores = evaluate_model(tiny_model_dir, config, size=4, teacher=in_process(backend))
    assert {"metric", "sampled_metric", "forward_kl", "reverse_kl", "divergence"} <= set(scores)
    for key in ("forward_kl", "reverse_kl", "divergence"):
        assert scores[key] == pytest.approx(0.0, abs=1e-5), key
    assert "forward_kl" not in evaluate_model(tiny_model_dir, config, size=4)  # no teacher


def test_the_divergence_is_the_trained_objectives_on_its_support(
    tmp_path, student_model_dir, backend
):
    """forward_kl and reverse_kl stay on the teacher's top-k + tail; divergence is the
    trained loss's: on the top-1 + tail, on the whole vocabulary, or on the union with the
    student's own top V - 1 ids, which leaves at most one token in the tail: exact."""

    def scores(*overrides: str) -> dict[str, float]:
        config = small_config(tmp_path, student_model_dir, "method.loss=reverse_kl", *overrides)
        return evaluate_model(student_model_dir, config, size=4, teacher=in_process(backend))

    top1 = scores("method.top_k=1")
    full = scores("method.loss_args.support=full")
    union = scores("method.top_k=1", f"method.student_candidates={backend.vocab_size - 1}")
    assert top1["divergence"] == top1["reverse_kl"]
    assert union["reverse_kl"] == top1["reverse_kl"]  # the samples and the top-1 alike
    assert union["divergence"] == pytest.approx(full["divergence"], rel=1e-4)
    assert abs(top1["divergence"] - full["divergence"]) > 0.01 * full["divergence"]


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
