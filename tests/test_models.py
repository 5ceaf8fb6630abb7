"""The built-in tasks' committed models: Llama checkpoints loaded through the ordinary
from_pretrained path (the one a user's own model takes), the students the declared
fractions of their teacher and each at least 15 points below it, and `pretrain`
reproducing the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from distill_lab.models import architectures, build_tokenizer, model_dir, pretrain
from student_trainer.chat_template import CHAT_TEMPLATE
from student_trainer.config import load_config
from student_trainer.evaluate import evaluate_split
from teacher_service.backend import HFBackend, ScoreItem
from teacher_service.scoring import ScoreOptions

ROOT = Path(__file__).resolve().parent.parent
TASK_NAMES = ("translation", "arithmetic", "records")
STUDENTS = [
    (task, role) for task in TASK_NAMES for role in architectures(task) if role != "teacher"
]
# records' width sweep of 2-layer students: about 1/32, 1/18 and 1/11 of the teacher
FRACTIONS = {"student-small": (25, 40), "student-medium": (14, 22), "student-large": (9, 14)}


def _params(path: Path) -> int:
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert isinstance(model, LlamaForCausalLM)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("task", "role"), STUDENTS)
def test_committed_models_load_through_from_pretrained_and_share_a_tokenizer(task, role):
    teacher, student = (ROOT / model_dir(task, name) for name in ("teacher", role))
    low, high = FRACTIONS.get(role, (10, 100))
    assert low * _params(student) <= _params(teacher) <= high * _params(student)
    vocabularies = [
        AutoTokenizer.from_pretrained(path, local_files_only=True).get_vocab()
        for path in (teacher, student, ROOT / "models" / task / "tokenizer")
    ]
    assert vocabularies[0] == vocabularies[1] == vocabularies[2]
    summary = json.loads((teacher / "pretrain.json").read_text())
    assert summary["parameters"] == _params(teacher)


def test_committed_weights_stay_under_32_mb():
    sizes = [p.stat().st_size for p in (ROOT / "models").rglob("*.safetensors")]
    assert len(sizes) == len(TASK_NAMES) + len(STUDENTS) and sum(sizes) <= 32 * 1024 * 1024


def test_service_backend_scores_the_committed_teacher_like_a_plain_forward():
    path = ROOT / model_dir("translation", "teacher")
    backend = HFBackend.load(path, device="cpu", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = tokenizer("Number: 42105\nGerman: zweiundvierzigtausendeinhundertfünf")["input_ids"]
    sequence = torch.tensor(ids)
    options = ScoreOptions(top_k=5, full=True, temperature=1.0, dtype=torch.float32)
    (scores,) = backend.score_batch([ScoreItem(sequence, 1, options, None)]).scores
    with torch.no_grad():
        logits = model(input_ids=sequence[None]).logits[0, :-1, : len(tokenizer)]
    expected = torch.log_softmax(logits.double(), dim=-1)
    torch.testing.assert_close(scores.full_logprobs.double(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        scores.target_logprobs.double(),
        expected.gather(1, sequence[1:, None])[:, 0],
        atol=1e-4,
        rtol=0,
    )


# Under greedy decoding the wider records students come within 15 points of the teacher
# (docs/RESULTS.md says why); under sampling every student leaves at least 15.
GREEDY_GAP = {(task, role) for task, role in STUDENTS if role in ("student", "student-small")}


@pytest.mark.parametrize(("task", "student"), STUDENTS)
def test_teacher_beats_each_student_by_15_points_on_held_out_prompts(task, student):
    config = load_config(
        ROOT / "configs" / "paper" / f"{task}.yaml",
        ["method.name=sft", "teacher.in_process=", "run.progress=false"],
    )
    scores = {}
    for role in ("teacher", student):
        config.student.model = str(ROOT / model_dir(task, role))
        scores[role] = evaluate_split(config, "test", size=100)
    teacher, student_scores = scores["teacher"], scores[student]
    assert teacher["sampled_metric"] >= student_scores["sampled_metric"] + 15, scores
    if (task, student) in GREEDY_GAP:
        assert teacher["metric"] >= student_scores["metric"] + 15, scores


def test_pretrain_builds_a_loadable_model_with_the_tasks_tokenizer(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = pretrain(
        "arithmetic",
        "student",
        root=tmp_path / "models",
        runs_dir=tmp_path / "runs",
        overrides=["optim.steps=3", "run.eval_size=4", "run.progress=false", "optim.batch_size=4"],
    )
    assert out == tmp_path / "models" / "arithmetic" / "student"
    summary = json.loads((out / "pretrain.json").read_text())
    assert summary["steps"] == 3 and summary["parameters"] == _params(out)
    rebuilt = build_tokenizer("arithmetic", tmp_path / "tokenizer")
    committed = AutoTokenizer.from_pretrained(ROOT / "models/arithmetic/tokenizer")
    assert rebuilt.get_vocab() == committed.get_vocab()  # the tokenizer is reproducible
    loaded = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert loaded.get_vocab() == committed.get_vocab()
    trained = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "runs/arithmetic-student/init")
    changed = [not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters())]
    assert all(changed)  # three SFT steps moved every tensor
    # what the committed models carry: the padded rows suppressed, the chat template
    rows = trained.get_output_embeddings().weight.shape[0]
    suppressed = json.loads((out / "generation_config.json").read_text())["suppress_tokens"]
    assert suppressed == list(range(len(committed), rows)) and rows > len(committed)
    for built in (out, tmp_path / "tokenizer"):
        config = json.loads((built / "tokenizer_config.json").read_text())
        assert config["chat_template"] == CHAT_TEMPLATE, built
