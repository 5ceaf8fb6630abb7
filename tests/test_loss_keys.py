"""The keys before method.loss (method.beta, method.support) still train what they trained:
the same run with the old keys and with method.loss gives the same losses and evaluations
bit for bit, and the old keys say what replaces them."""

from __future__ import annotations

import logging
import warnings

import pytest

from student_trainer.config import ConfigError, load_config, objective_from
from student_trainer.train import train
from teacher_client.objectives import make_objective
from tests.trainer_helpers import in_process, small_config

# (old keys, new keys, what the deprecation message names as the replacement)
LOSSES = {
    "forward_kl": (["method.beta=0"], ["method.loss=forward_kl"], "method.loss=forward_kl"),
    "reverse_kl": (["method.beta=1"], ["method.loss=reverse_kl"], "method.loss=reverse_kl"),
    "jsd_full": (
        ["method.beta=0.3", "method.support=full"],
        ["method.loss=jsd", "method.loss_args.beta=0.3", "method.loss_args.support=full"],
        "method.loss=jsd, method.loss_args.beta=0.3, method.loss_args.support=full",
    ),
    "sampled_rkl": (
        ["method.support=sampled", "method.beta=1"],
        ["method.loss=sampled_rkl"],
        "method.loss=sampled_rkl",
    ),
}
RUN = ("optim.steps=2", "method.lmbda=1", "run.eval_size=4", "rollout.max_new_tokens=4")


@pytest.mark.parametrize("name", list(LOSSES))
def test_old_and_new_keys_train_the_same_numbers(tmp_path, student_model_dir, backend, name):
    old, new, replacement = LOSSES[name]
    with pytest.warns(DeprecationWarning) as warned:
        old_config = small_config(tmp_path / "old", student_model_dir, *RUN, *old)
    (message,) = [str(w.message) for w in warned if "deprecated" in str(w.message)]
    assert message.endswith(f"deprecated: use {replacement}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new keys: no message
        new_config = small_config(tmp_path / "new", student_model_dir, *RUN, *new)
    assert objective_from(old_config.method) == objective_from(new_config.method)
    assert objective_from(new_config.method).name == name.removesuffix("_full")
    runs = [train(c, teacher=in_process(backend)) for c in (old_config, new_config)]
    assert runs[0].losses == runs[1].losses and len(runs[0].losses) == 2
    assert runs[0].evaluations == runs[1].evaluations and len(runs[0].evaluations) == 2


def test_the_deprecation_is_logged_too(caplog):
    logged = caplog.at_level(logging.WARNING, logger="student_trainer.config")
    with logged, pytest.warns(DeprecationWarning):
        load_config(None, ["method.beta=1", "teacher.address=h:1"])
    assert "method.beta=1 is deprecated: use method.loss=reverse_kl" in caplog.text


def test_nothing_set_is_todays_default_jsd_on_the_top_k():
    config = load_config(None, ["teacher.address=h:1"])
    assert objective_from(config.method) == make_objective("jsd", beta=0.5, support="topk")


def test_old_and_new_keys_together_are_refused_naming_the_old_one():
    with pytest.raises(ConfigError, match=r"^method\.beta: deprecated, and method\.loss"):
        load_config(None, ["method.beta=1", "method.loss=reverse_kl"])
    with pytest.raises(ConfigError, match=r"^method\.support: deprecated"):
        load_config(None, ["method.support=full", "method.loss_args.beta=0.2"])
