"""Bigger students: LoRA adapters (real peft), gradient checkpointing, autocast, and the
padded output rows the sampler must never draw. All on the tiny CPU models; CUDA's fp16
path (GradScaler) is not exercised here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from causal_lm.sampling import SamplingOptions
from student_trainer.checkpoint import latest_checkpoint
from student_trainer.cli import main as cli_main
from student_trainer.config import (
    ConfigError,
    LoraConfig,
    MethodConfig,
    RolloutConfig,
    load_config,
    objective_from,
)
from student_trainer.lora import ADAPTER_CONFIG, require_peft
from student_trainer.microbatch import MicroBatchBuilder
from student_trainer.objective import token_logprobs
from student_trainer.precision import Precision
from student_trainer.rollouts import build_batch, sample_completions
from student_trainer.student import Student, load_student
from student_trainer.tasks import Example
from student_trainer.train import Trainer, train
from tests.trainer_helpers import in_process, small_config

pytest.importorskip("peft")  # the lora extra (part of dev: make venv installs it)
# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`: theirs, not ours
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")

LORA = ("student.lora.r=4", "student.lora.alpha=8")
CPU = torch.device("cpu")
PROMPTS = [
    "Ada has 12 apples. Ben gives Ada 3 more, so Ada has",
    "Gus has 7 coins. Fay gives Gus 2 more, so Gus has",
    "Hana has 40 books. Ivo gives Hana 5 more, so Hana has",
]


def prompt_ids(student: Student) -> list[list[int]]:
    return [student.tokenizer(text)["input_ids"] for text in PROMPTS]


def sft_batch(student: Student):
    """The prompts completed with a few tokens each, as one training batch."""
    prompts = prompt_ids(student)
    completions = [[*student.tokenizer(" 15.")["input_ids"][1:], min(student.eos_ids)]] * 3
    return build_batch(prompts, completions, eos_ids=student.eos_ids, pad_id=student.pad_id)


def greedy(model: torch.nn.Module, student: Student) -> list[list[int]]:
    return sample_completions(
        model,
        prompt_ids(student),
        SamplingOptions(8, temperature=0.0),
        vocab_size=student.vocab,
        eos_ids=student.eos_ids,
        pad_id=student.pad_id,
        generator=None,
    )


def count_forwards(module: torch.nn.Module) -> list[int]:
    """A list that grows by one each time `module` starts a forward (a recompute included:
    one that stops early, once it has what the backward needs, still starts)."""
    calls: list[int] = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def frozen_and_trainable(model: torch.nn.Module) -> tuple[dict, dict]:
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return frozen, trainable


def test_lora_trains_only_the_adapters(tmp_path, student_model_dir, backend):
    config = small_config(tmp_path, student_model_dir, *LORA, "optim.steps=3")
    trainer = Trainer(config, teacher=in_process(backend))
    model = trainer.student.model
    frozen, before = frozen_and_trainable(model)
    assert before and all("lora_" in name for name in before)
    held = [p for group in trainer.state.optimizer.param_groups for p in group["params"]]
    assert len(held) == len(before) and all(p.requires_grad for p in held)
    for _ in range(3):
        trainer.train_step()
    trainer.close()
    after_frozen, after = frozen_and_trainable(model)
    for name, value in frozen.items():
        assert torch.equal(after_frozen[name], value), name  # base weights bit-identical
    assert any(not torch.equal(after[n], before[n]) for n in before)  # the adapters moved


def test_lora_targets_the_named_modules_only(student_model_dir):
    lora = LoraConfig(r=4, alpha=8, target_modules="q_proj, v_proj")
    student = load_student(student_model_dir, "float32", CPU, lora=lora)
    trainable = [n for n, p in student.model.named_parameters() if p.requires_grad]
    assert trainable and all(".q_proj.lora_" in n or ".v_proj.lora_" in n for n in trainable)
    assert {n.rsplit(".", 2)[-2] for n in trainable} == {"default"}


def test_the_lora_loss_goes_down_over_a_few_steps(tmp_path, student_model_dir, backend):
    """Supervised KD on the same four examples every step: the adapters fit them."""
    config = small_config(
        tmp_path,
        student_model_dir,
        *LORA,
        "method.lmbda=0",
        "task.train_size=4",
        "optim.steps=8",
        "optim.lr=0.03",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
    )
    losses = train(config, teacher=in_process(backend)).losses
    assert losses[-1] < 0.8 * losses[0], losses


def test_a_resumed_lora_run_gives_the_uninterrupted_runs_losses(
    tmp_path, student_model_dir, backend
):
    """Adapters with dropout (a random stream) and gradient checkpointing, on-policy and
    off-policy steps mixed: stopped at 3 and resumed, the losses and adapters are the
    uninterrupted run's exactly; a checkpoint holds the adapters, not the base weights."""
    overrides = (
        *LORA,
        "student.lora.dropout=0.1",
        "student.gradient_checkpointing=true",
        "method.lmbda=0.5",
        "method.student_candidates=4",
        "optim.grad_accum=2",
        "optim.steps=6",
        "optim.schedule=linear",
    )
    straight = train(
        small_config(tmp_path / "a", student_model_dir, *overrides), teacher=in_process(backend)
    )
    interrupted = small_config(tmp_path / "b", student_model_dir, *overrides)
    first = train(interrupted, teacher=in_process(backend), stop_after=3)
    saved = latest_checkpoint(tmp_path / "b")
    assert saved.name == "step-00000003" and (saved / ADAPTER_CONFIG).is_file()
    assert not (saved / "model.safetensors").exists()  # adapters only
    second = train(interrupted, teacher=in_process(backend), resume="auto")
    assert first.losses + second.losses == straight.losses
    a = load_file(latest_checkpoint(tmp_path / "a") / "adapter_model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "b") / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()]
    assert [r["loss"] for r in logged if "loss" in r] == straight.losses


def test_a_whole_model_checkpoint_is_not_resumed_as_lora(tmp_path, student_model_dir, backend):
    config = small_config(tmp_path, student_model_dir, "optim.steps=1")
    train(config, teacher=in_process(backend))
    lora = small_config(tmp_path, student_model_dir, *LORA, "optim.steps=2")
    with pytest.raises(ConfigError, match=r"^student\.lora\.r: .*a whole model"):
        Trainer(lora, teacher=in_process(backend), resume="auto")


def test_the_merged_export_computes_the_adapter_models_logits(
    tmp_path, student_model_dir, backend, capsys
):
    """`student-trainer export` merges the adapters into a plain model directory: it loads
    with AutoModelForCausalLM (no peft), its logits are the adapter model's, and the KV-cache
    sampler, given the adapter model, samples what the merged one does."""
    config = small_config(tmp_path / "run", student_model_dir, *LORA, "optim.lr=0.05")
    train(config, teacher=in_process(backend))
    checkpoint = latest_checkpoint(tmp_path / "run")
    cli_main(["export", str(checkpoint), str(tmp_path / "merged")])
    assert "plain transformers model" in capsys.readouterr().out
    assert not (tmp_path / "merged" / ADAPTER_CONFIG).exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = load_student(checkpoint, "float32", CPU)
    base = AutoModelForCausalLM.from_pretrained(student_model_dir).eval()
    adapted.model.eval()
    batch = sft_batch(adapted)
    with torch.no_grad():
        want = adapted.model(input_ids=batch.input_ids).logits
        got = merged(input_ids=batch.input_ids).logits
        plain = base(input_ids=batch.input_ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert (plain - want).abs().max() > 1e-2  # the adapters changed the model
    assert greedy(adapted.model, adapted) == greedy(merged, adapted)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(student_model_dir, lora):
    """And it is really on: what a decoder layer computes runs again in the backward."""
    settings = LoraConfig(r=4, alpha=8) if lora else None
    results = []
    for checkpointing in (False, True):
        student = load_student(
            student_model_dir, "float32", CPU, lora=settings, gradient_checkpointing=checkpointing
        )
        student.model.train()
        calls = count_forwards(student.model.get_decoder().layers[0].mlp)
        rows, targets = student.completion_rows(sft_batch(student))
        loss = -token_logprobs(rows, targets).mean()
        loss.backward()
        grads = {n: p.grad for n, p in student.model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, len(calls)))
    (plain, plain_grads, plain_calls), (checked, checked_grads, checked_calls) = results
    assert (plain_calls, checked_calls) == (1, 2)
    assert torch.allclose(plain, checked, atol=1e-5, rtol=0)
    assert plain_grads.keys() == checked_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, checked_grads[name], atol=1e-5, rtol=0), name


def test_gradient_checkpointing_leaves_sampling_alone(student_model_dir):
    """The sampler runs in eval mode without gradients: KV cache on, the same samples."""
    samples = []
    for checkpointing in (False, True):
        student = load_student(
            student_model_dir, "float32", CPU, gradient_checkpointing=checkpointing
        )
        student.model.train()
        samples.append(
            sample_completions(
                student.model,
                prompt_ids(student),
                SamplingOptions(8, temperature=1.0),
                vocab_size=student.vocab,
                eos_ids=student.eos_ids,
                pad_id=student.pad_id,
                generator=torch.Generator().manual_seed(3),
            )
        )
        assert student.model.training  # given back in the mode it came in
    assert samples[0] == samples[1]


def test_padded_output_rows_are_never_sampled(student_model_dir):
    """Output rows past the tokenizer scaled x1000 dominate every logit, yet on-policy
    sampling (the trainer's path) never draws an id >= len(tokenizer)."""
    student = load_student(student_model_dir, "float32", CPU)
    vocab = student.vocab
    weight = student.model.get_output_embeddings().weight
    assert weight.shape[0] > vocab  # the tiny models are padded
    with torch.no_grad():
        weight[vocab:] *= 1000
        logits = student.model(input_ids=torch.tensor(prompt_ids(student)[:1])).logits
    assert int(logits[0, -1].argmax()) >= vocab  # unmasked, a padded row would win
    method = MethodConfig()
    builder = MicroBatchBuilder(
        student,
        None,
        method,
        RolloutConfig(max_new_tokens=12),
        teacher_dtype="float32",
        seed=0,
        generator=torch.Generator().manual_seed(0),
        objective=objective_from(method),
    )
    examples = [Example(text, "") for text in PROMPTS] * 4
    prompts = prompt_ids(student) * 4
    for step in range(3):
        completions = builder.completions(prompts, examples, on_policy=True, step=step, index=0)
        assert all(0 <= token < vocab for c in completions for token in c)


def test_bf16_autocast_on_cpu_trains_close_to_float32(tmp_path, student_model_dir, backend):
    losses = []
    for autocast in ("none", "bf16"):
        config = small_config(
            tmp_path / autocast, student_model_dir, "method.lmbda=0", f"student.autocast={autocast}"
        )
        trainer = Trainer(config, teacher=in_process(backend))
        assert (trainer.precision.dtype is None) == (autocast == "none")
        losses.append([trainer.train_step()["loss"] for _ in range(2)])
        trainer.close()
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)


def test_a_loss_scaler_leaves_the_step_unchanged_and_is_checkpointed(
    tmp_path, student_model_dir, backend
):
    """fp16's GradScaler path (scaled backward, unscale before clipping, step, update) with
    a power-of-two scale on CPU: the same losses and weights as a plain run (scaling by
    2^k is exact), and the scale travels in the checkpoint."""
    runs = []
    for scaled in (False, True):
        config = small_config(tmp_path / str(scaled), student_model_dir, "optim.steps=2")
        trainer = Trainer(config, teacher=in_process(backend))
        if scaled:  # what student.autocast=fp16 builds on CUDA, without the autocast
            trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        losses = [trainer.train_step()["loss"] for _ in range(2)]
        trainer.save()
        weights = [p.detach().clone() for p in trainer.student.model.parameters()]
        trainer.close()
        runs.append((losses, weights))
    (plain, plain_weights), (scaled, scaled_weights) = runs
    assert scaled == plain
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, scaled_weights))
    state = torch.load(
        latest_checkpoint(tmp_path / "True") / "trainer_state.pt", weights_only=False
    )
    assert state["grad_scaler"]["scale"] == 2.0**10


def test_fp16_autocast_is_refused_off_cuda():
    with pytest.raises(ConfigError, match=r"^student\.autocast: fp16 autocast needs CUDA"):
        Precision.create("fp16", CPU)  # e.g. student.device=auto on a machine without a GPU


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["student.lora.r=-1"], "student.lora.r: -1 must be >= 0"),
        ([*LORA, "student.lora.alpha=0"], "student.lora.alpha"),
        ([*LORA, "student.lora.dropout=1.0"], "student.lora.dropout"),
        ([*LORA, "student.lora.target_modules=q_proj,,v_proj"], "student.lora.target_modules"),
        (["student.lora.rank=4"], "student.lora.rank: unknown key"),
        (["student.lora=4"], "student.lora: expected a mapping"),
        (["student.gradient_checkpointing=sometimes"], "student.gradient_checkpointing"),
        (["student.autocast=fp8"], "student.autocast: 'fp8' not in"),
        (["student.autocast=fp16"], "student.autocast: fp16 autocast needs CUDA"),
        (
            ["student.autocast=fp16", "student.device=cuda", "student.dtype=float16"],
            "student.autocast: fp16 autocast scales float32 gradients",
        ),
    ],
)
def test_bad_student_settings_are_named(overrides, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["method.name=sft", *overrides])
    assert str(error.value).startswith(key)


def test_lora_without_peft_names_the_key_and_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ConfigError, match=r"^student\.lora\.r: LoRA needs peft.*pip install"):
        load_config(None, list(LORA))
    with pytest.raises(ConfigError, match=r"^student\.lora\.r: .*pip install"):
        require_peft()


def test_target_modules_that_match_nothing_are_named(tmp_path, student_model_dir):
    lora = LoraConfig(r=4, alpha=8, target_modules="no_such_proj")
    with pytest.raises(ConfigError, match=r"^student\.lora\.target_modules: "):
        load_student(student_model_dir, "float32", CPU, lora=lora)


def test_an_adapter_checkpoint_names_its_base_absolutely(tmp_path, student_model_dir, backend):
    """So `eval --checkpoint` and `export` find the base from any working directory."""
    config = small_config(tmp_path, student_model_dir, *LORA, "optim.steps=1")
    train(config, teacher=in_process(backend))
    recorded = json.loads((latest_checkpoint(tmp_path) / ADAPTER_CONFIG).read_text())
    assert Path(recorded["base_model_name_or_path"]) == Path(student_model_dir).resolve()
