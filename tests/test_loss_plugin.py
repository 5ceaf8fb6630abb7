"""A new loss in one file: a skew KL divergence, defined and registered here, trains through
the real Trainer with `method.loss=skew_kl method.loss_args.skew=...`, and nothing else in
the project names it.

The skew KL (DistiLLM, Ko et al. 2024) is KL(p || skew p + (1 - skew) q): forward KL to a
mixture that holds some of the teacher, bounded where plain KL(p || q) is not. It asks the
teacher for whole rows (support full). The first step's loss is checked against the skew
KL written out from an unpadded forward of each model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from transformers import AutoModelForCausalLM

from student_trainer.config import ConfigError, objective_from
from student_trainer.train import Trainer, train
from teacher_client import ScoreOptions
from teacher_client.objectives import Objective, TeacherRows, register_loss
from tests.conftest import reference_logprobs
from tests.trainer_helpers import SpyTeacher, in_process, small_config

SKEW, TEMPERATURE = 0.3, 1.5


@register_loss("skew_kl")
@dataclass(frozen=True)
class SkewKL(Objective):
    """KL(p || skew p + (1 - skew) q) over the whole vocabulary, per position."""

    skew: float = 0.1  # the teacher's share of the mixture, in (0, 1)
    support: ClassVar[str] = "full"

    def check(self) -> None:
        super().check()
        if not 0.0 < self.skew < 1.0:
            raise ValueError(f"skew: {self.skew} is outside (0, 1)")

    def token_losses(
        self, logits: torch.Tensor, targets: torch.Tensor, teacher: TeacherRows
    ) -> tuple[torch.Tensor, torch.Tensor]:
        log_q = torch.log_softmax(logits.float() / self.temperature, dim=-1)  # [n, V]
        log_p = teacher.full_logprobs  # [n, V], at the temperature already
        mixture = [log_p + math.log(self.skew), log_q + math.log1p(-self.skew)]
        log_m = torch.logsumexp(torch.stack(mixture), dim=0)  # [n, V]
        value = (log_p.exp() * (log_p - log_m)).sum(-1)  # [n]
        return value, value.detach()


class Recording(SpyTeacher):
    """Keeps the sequences, where scoring starts and the options of every Score call."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.scored: list[tuple[list[list[int]], list[int], ScoreOptions]] = []

    def submit_score(self, sequences, score_from, options, *, candidates=None):
        self.scored.append(([list(s) for s in sequences], list(score_from), options))
        return super().submit_score(sequences, score_from, options, candidates=candidates)


def plugin_config(tmp_path, student_dir, *overrides):
    return small_config(
        tmp_path,
        student_dir,
        "method.loss=skew_kl",
        f"method.loss_args.skew={SKEW}",
        f"method.temperature={TEMPERATURE}",
        *overrides,
    )


def test_the_config_builds_the_registered_loss_with_its_own_key(tmp_path, student_model_dir):
    config = plugin_config(tmp_path, student_model_dir)
    objective = objective_from(config.method)
    assert objective == SkewKL(temperature=TEMPERATURE, skew=SKEW)
    assert objective.score_options().full and objective.score_options().top_k == 0


def test_a_plugin_loss_trains_and_its_first_step_is_the_skew_kl(
    tmp_path, student_model_dir, backend
):
    # dataset outputs (lmbda = 0): the first step's sequences are known before it runs
    config = plugin_config(tmp_path, student_model_dir, "method.lmbda=0", "optim.steps=3")
    initial = AutoModelForCausalLM.from_pretrained(student_model_dir).eval()
    teacher = Recording(in_process(backend))
    result = train(config, teacher=teacher)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)

    sequences, starts, _ = teacher.scored[0]  # step 1, its one micro-batch
    total, tokens = 0.0, 0
    for sequence, start in zip(sequences, starts, strict=True):
        rows = slice(start - 1, len(sequence) - 1)  # the positions predicting the completion
        log_p = reference_logprobs(backend, sequence, TEMPERATURE)[rows].double()
        with torch.no_grad():
            logits = initial(torch.tensor([sequence])).logits[0, rows, : backend.vocab_size]
        q = torch.softmax(logits.double() / TEMPERATURE, dim=-1)
        p = log_p.exp()
        m = SKEW * p + (1 - SKEW) * q
        total += float((p * (p / m).log()).sum())
        tokens += len(sequence) - start
    assert result.losses[0] == pytest.approx(total / tokens, rel=1e-5)


def test_the_plugins_keys_are_checked_by_name(tmp_path, student_model_dir):
    with pytest.raises(ConfigError, match=r"^method\.loss_args\.skw: not a key of loss skew_kl"):
        plugin_config(tmp_path, student_model_dir, "method.loss_args.skw=0.2")
    with pytest.raises(ConfigError, match=r"^method\.loss_args\.skew: 1\.5 is outside \(0, 1\)"):
        plugin_config(tmp_path, student_model_dir, "method.loss_args.skew=1.5")
    with pytest.raises(ConfigError, match=r"^method\.loss_args\.skew: expected float"):
        plugin_config(tmp_path, student_model_dir, "method.loss_args.skew=high")


def test_the_trainer_asks_the_teacher_for_what_the_plugin_needs(
    tmp_path, student_model_dir, backend
):
    """support full: whole rows, no top-k; the handshake checks no top_k against the
    vocabulary, since none is asked for."""
    config = plugin_config(tmp_path, student_model_dir, "method.top_k=100000")
    teacher = Recording(in_process(backend))
    trainer = Trainer(config, teacher=teacher)
    try:
        trainer.train_step()
    finally:
        trainer.close()
    ((_, _, options),) = teacher.scored
    assert (options.full, options.top_k, options.temperature) == (True, 0, TEMPERATURE)


PLUGIN_MODULE = '''
from dataclasses import dataclass

import torch

from teacher_client.objectives import Objective, register_loss


@register_loss("total_variation_plugin")
@dataclass(frozen=True)
class TotalVariation(Objective):
    """Half the L1 distance between teacher and student on the top-k + tail support."""

    def token_losses(self, logits, targets, teacher):
        q = torch.softmax(logits.float() / self.temperature, dim=-1)
        p_top = teacher.support_logprobs.exp()
        q_top = q.gather(-1, teacher.support_ids)
        tail = (1 - p_top.sum(-1)) - (1 - q_top.sum(-1))
        value = 0.5 * ((p_top - q_top).abs().sum(-1) + tail.abs())
        return value, value.detach()
'''


def test_a_command_line_names_a_loss_in_the_users_own_module(
    tmp_path, student_model_dir, backend, monkeypatch
):
    """`method.loss=module:name` imports the module (which registers the loss) and trains
    with it; a module that is not there is a config error naming method.loss."""
    (tmp_path / "my_losses_for_the_test.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "my_losses_for_the_test:total_variation_plugin"
    config = small_config(tmp_path / "run", student_model_dir, f"method.loss={name}")
    objective = objective_from(config.method)
    assert type(objective).__name__ == "TotalVariation"
    assert objective.name == "total_variation_plugin"
    result = train(config, teacher=in_process(backend))
    assert len(result.losses) == config.optim.steps
    assert all(0 < loss < 1 for loss in result.losses)  # a total variation is within [0, 1]
    with pytest.raises(ConfigError, match=r"^method\.loss: 'no_such_module:tv': cannot import"):
        small_config(tmp_path / "other", student_model_dir, "method.loss=no_such_module:tv")
