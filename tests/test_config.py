"""Configs: YAML + --set into dataclasses; every bad key or value named in the error."""

from __future__ import annotations

import pytest

from student_trainer.config import ConfigError, TrainConfig, load_config, objective_from
from teacher_client.objectives import make_objective


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides(tmp_path):
    path = write(
        tmp_path,
        "method:\n  loss: jsd\n  loss_args: {beta: 0.1}\n  lmbda: 0.5\n"
        "optim:\n  lr: 3e-3\n  steps: 7\n",
    )
    overrides = [
        "method.loss_args.beta=0.9",
        "run.out_dir=/tmp/x",
        "run.progress=false",
        "teacher.address=h:1",
    ]
    config = load_config(path, overrides)
    assert config.method.loss_args == {"beta": 0.9}  # --set wins over the file
    assert config.method.lmbda == 0.5
    assert config.optim.lr == pytest.approx(0.003)  # YAML 1.1 reads 3e-3 as a string
    assert config.optim.steps == 7
    assert config.run.out_dir == "/tmp/x" and config.run.progress is False
    assert config.rollout == TrainConfig().rollout  # untouched sections keep their defaults


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.lmbda=1.5", "method.lmbda"),
        ("method.lmbda=-0.1", "method.lmbda"),
        ("method.beta=-0.1", "method.beta"),
        ("method.beta=1.01", "method.beta"),
        ("method.temperature=0", "method.temperature"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("method.alpha=2", "method.alpha"),
        ("method.name=distill", "method.name"),
        ("method.support=dense", "method.support"),
        ("method.reward=bleu", "method.reward"),
        ("optim.schedule=step", "optim.schedule"),
        ("optim.steps=0", "optim.steps"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.steps=2.5", "optim.steps"),
        ("task.name=xsum", "task.name"),
        ("method.bta=0.5", "method.bta"),
        ("methods.beta=0.5", "methods"),
        ("method.support=sampled", "method.beta"),  # the sampled estimator is reverse KL only
        ("method.loss=tvd", "method.loss"),
        ("method.loss_args.bta=0.5", "method.loss_args.bta"),
        ("method.loss_args.beta=2", "method.loss_args.beta"),
        ("method.loss_args.top_k=8", "method.loss_args.top_k"),  # a key every loss shares
        ("method.loss_args=0.5", "method.loss_args"),
        ("method.top_k=0", "method.top_k"),
    ],
)
def test_bad_values_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value).startswith(f"{key}:")


def test_loss_args_from_yaml_and_set_merge_key_by_key(tmp_path):
    path = write(tmp_path, "method:\n  loss: jsd\n  loss_args:\n    support: full\n    beta: 0.1\n")
    config = load_config(path, ["method.loss_args.beta=0.9", "teacher.address=h:1"])
    assert config.method.loss_args == {"support": "full", "beta": 0.9}
    assert objective_from(config.method) == make_objective("jsd", beta=0.9, support="full")


def test_the_sampled_estimator_needs_fresh_on_policy_samples():
    with pytest.raises(ConfigError, match=r"^method\.lmbda: loss sampled_rkl needs student"):
        load_config(None, ["method.loss=sampled_rkl", "method.lmbda=0.5"])
    with pytest.raises(ConfigError, match=r"^rollout\.max_staleness: loss sampled_rkl is a"):
        load_config(None, ["method.loss=sampled_rkl", "rollout.max_staleness=1"])


def test_rl_needs_on_policy_steps():
    with pytest.raises(ConfigError, match=r"^method\.alpha:"):
        load_config(None, ["method.alpha=0.5", "method.lmbda=0.5"])
    config = load_config(
        None, ["method.alpha=0.5", "method.samples_per_prompt=4", "teacher.address=h:1"]
    )
    assert config.method.alpha == 0.5


def test_unknown_key_in_yaml_lists_the_known_ones(tmp_path):
    path = write(tmp_path, "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"^optim\.learning_rate: unknown key \(known: .*lr"):
        load_config(path)


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"^method: expected a mapping"):
        load_config(write(tmp_path, "method: gkd\n"))


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["method.beta"])


def test_sft_needs_no_teacher_but_gkd_does():
    assert load_config(None, ["method.name=sft", "teacher.address="]).uses_teacher is False
    with pytest.raises(ConfigError, match=r"^teacher\.address:"):
        load_config(None, ["teacher.address="])
