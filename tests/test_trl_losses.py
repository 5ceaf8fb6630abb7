"""The TRL adapter trains with the loss it is given by name (teacher_client.objectives).

Run where a TRL user's run is (the `make trl-venv` venv, from `/`, as tests/test_trl.py
does): a TeacherServiceDistillationTrainer with `loss="reverse_kl"` computes, on one batch
of the tiny student's samples scored by the tiny teacher over gRPC, the reverse KL on the
teacher's top-k + tail support, checked against an independent computation from both
models' full distributions; and losses on supports it does not fetch are refused by name.
"""

from __future__ import annotations

import pytest

from tests.test_trl import TOPK_TAIL_REFERENCE, run_in_trl_venv

TOP_K = 8

SCRIPT = (
    TOPK_TAIL_REFERENCE
    + """
import json, sys, tempfile
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DistillationConfig

from teacher_client import TeacherClient
from teacher_client.trl import TeacherServiceDistillationTrainer

address, teacher_dir, student_dir, out_path, top_k = sys.argv[1:6]
top_k = int(top_k)
PROMPTS = [
    "Ada has 12 apples. Ben gives Ada 3 more, so Ada has",
    "Cleo has 40 marbles. Cleo loses 7 of them, so Cleo has",
    "Fay has 101 coins. Fay sells 20 of them to Gus, so Gus has",
    "Juno has 66 stamps. Juno gives away 6 of them, so Juno has",
]
TEMPERATURE = 0.9
tokenizer = AutoTokenizer.from_pretrained(student_dir, local_files_only=True)


def trainer(client, out_dir, **options):
    args = DistillationConfig(
        output_dir=out_dir, per_device_train_batch_size=len(PROMPTS), max_steps=1, beta=0.5,
        temperature=TEMPERATURE, max_completion_length=8, seed=0, use_cpu=True, bf16=False,
        fp16=False, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, shuffle_dataset=False,
    )
    return TeacherServiceDistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
        teacher=client, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), top_k=top_k, **options,
    )


REFUSED = {
    "full": dict(loss="jsd", loss_args={"support": "full"}),
    "sampled": dict(loss="sampled_rkl"),
    "unknown": dict(loss="total_variation"),
    "shared key": dict(loss="reverse_kl", loss_args={"temperature": 2.0}),
    "bad value": dict(loss="jsd", loss_args={"beta": 1.5}),
}
result = {"refused": {}}
with tempfile.TemporaryDirectory() as out_dir, TeacherClient(address, timeout=60) as client:
    for label, options in REFUSED.items():
        try:
            trainer(client, out_dir, **options)
        except ValueError as error:
            result["refused"][label] = str(error)
    result["default"] = repr(trainer(client, out_dir).objective)
    chosen = trainer(client, out_dir, loss="reverse_kl")
    result["objective"] = repr(chosen.objective)
    model = chosen.model.eval()
    inputs = chosen._generate_and_score_completions([{"prompt": p} for p in PROMPTS])
    with torch.no_grad():
        loss, _, count = chosen._compute_loss(model, inputs, None)

    # independent: both models' full distributions (unpadded forwards, float64), the
    # teacher's top-k support plus one tail bucket, KL(q||p) and JSD(0.5) written out
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    vocab, reverse, jsd, tokens = chosen.teacher_vocab_size, 0.0, 0.0, 0
    for q_b, p_b in topk_tail_rows(model, teacher, inputs, vocab, top_k, TEMPERATURE):
        m = 0.5 * p_b + 0.5 * q_b
        reverse += float(kl(q_b, p_b).sum())
        jsd += float((0.5 * kl(p_b, m) + 0.5 * kl(q_b, m)).sum())
        tokens += len(q_b)
    result.update(
        batch_loss=float(loss), batch_tokens=int(count), reference_tokens=tokens,
        reference_reverse_kl=reverse / tokens, reference_jsd=jsd / tokens,
    )

with open(out_path, "w") as out:
    json.dump(result, out)
"""
)


@pytest.fixture(scope="module")
def trl_losses(server, tiny_model_dir, student_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("trl-losses") / "result.json"
    arguments = (server.address, tiny_model_dir, student_model_dir, out, TOP_K)
    return run_in_trl_venv(SCRIPT, *arguments)


def test_the_named_loss_is_the_one_trained_on(trl_losses):
    assert trl_losses["objective"].startswith("ReverseKL(temperature=0.9, top_k=8,")
    assert trl_losses["batch_tokens"] == trl_losses["reference_tokens"] > 0
    reverse, jsd = trl_losses["reference_reverse_kl"], trl_losses["reference_jsd"]
    assert trl_losses["batch_loss"] == pytest.approx(reverse, rel=1e-4, abs=1e-6)
    assert abs(reverse - jsd) > 0.1 * reverse  # the default loss would have been caught


def test_the_default_is_jsd_at_trls_beta_and_temperature_on_the_top_k(trl_losses):
    assert trl_losses["default"] == (
        "JSD(temperature=0.9, top_k=8, student_candidates=0, support='topk', beta=0.5)"
    )


def test_losses_it_cannot_train_are_refused_by_name(trl_losses):
    refused = trl_losses["refused"]
    assert refused["full"].startswith("loss: jsd trains on the teacher's full answer")
    assert refused["sampled"].startswith("loss: sampled_rkl trains on the teacher's sampled")
    assert refused["unknown"].startswith("loss: 'total_variation' is not a registered loss")
    assert refused["shared key"].startswith("loss_args: ['temperature'] are set by the trainer")
    assert refused["bad value"] == "loss_args.beta: 1.5 is outside [0, 1]"
