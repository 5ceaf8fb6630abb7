"""Configs: YAML + --set into dataclasses; every bad key or value named in the error."""

from __future__ import annotations

import pytest

from student_trainer.config import ConfigError, TrainConfig, load_config


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "method:\n  beta: 0.1\n  lmbda: 0.5\noptim:\n  lr: 3e-3\n  steps: 7\n")
    overrides = [
        "method.beta=0.9",
        "run.out_dir=/tmp/x",
        "run.progress=false",
        "teacher.address=h:1",
    ]
    config = load_config(path, overrides)
    assert config.method.beta == 0.9  # --set wins over the file
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
    ],
)
def test_bad_values_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value).startswith(f"{key}:")


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
