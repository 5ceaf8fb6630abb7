"""The student's logits only at completion rows, a chunk of rows at a time: every loss the
trainer computes, values and parameter gradients, equals today's full computation
(`model(...).logits` over every position, the loss over all rows at once) in float32 to
1e-5, whatever the chunk size; and a 131k vocabulary trains without its [N, V] logits."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from student_trainer.config import ConfigError, load_config
from student_trainer.microbatch import student_candidates
from student_trainer.objective import (
    TeacherRows,
    completion_rows,
    divergence,
    reward_loss,
    token_logprobs,
)
from student_trainer.rollouts import Batch, build_batch
from student_trainer.rows import StudentRows
from student_trainer.student import Student, load_student, output_layer_splits_off
from teacher_client.objectives import Objective, make_objective
from teacher_service.in_process import InProcessTeacher
from tests.conftest import soft_capped_gemma2

ATOL = 1e-5
CHUNKS = [0, 1, 5, 7, 64]  # 0: all rows at once; 5 and 7 do not divide the 23 rows
LENGTHS = [(3, 6), (5, 9), (1, 4), (4, 4)]  # (prompt, completion): 23 completion rows
EOS = 2
LOSSES = {
    "forward KL": make_objective("forward_kl", top_k=8),
    "reverse KL": make_objective("reverse_kl", top_k=8),
    "JSD(0.5)": make_objective("jsd", beta=0.5, top_k=8, temperature=2.0),
    "candidates": make_objective("jsd", beta=0.5, top_k=4, student_candidates=4),
    "full": make_objective("jsd", beta=0.5, support="full", temperature=2.0),
    "sampled": make_objective("sampled_rkl", temperature=2.0),
    "sft NLL": None,
    "reward": None,
}


@pytest.fixture(scope="module")
def student(student_model_dir) -> Student:
    """The tiny student, its padded output rows made loud: any padded logit that reached a
    loss would dominate its softmax."""
    student = load_student(student_model_dir, "float32", torch.device("cpu"))
    assert student.model.lm_head.weight.shape[0] > student.vocab  # padded rows exist
    with torch.no_grad():
        student.model.lm_head.weight[student.vocab :] *= 100
    return student


@pytest.fixture(scope="module")
def batch(student) -> Batch:
    generator = torch.Generator().manual_seed(0)

    def tokens(count: int) -> list[int]:
        return torch.randint(3, student.vocab, (count,), generator=generator).tolist()

    prompts = [tokens(p) for p, _ in LENGTHS]
    return build_batch(prompts, [tokens(c) for _, c in LENGTHS], eos_ids={EOS}, pad_id=0)


def full_rows(student: Student, batch: Batch) -> tuple[StudentRows, torch.Tensor]:
    """Today's computation: logits at every position, cut to the vocabulary, then the
    completion rows, the loss over all of them at once."""
    logits = student.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[
        ..., : student.vocab
    ]
    rows, targets = completion_rows(logits, batch)
    return StudentRows(rows, None, student.vocab), targets


def teacher_rows(backend, batch: Batch, objective: Objective, candidates) -> TeacherRows:
    options = objective.score_options()
    results = InProcessTeacher(backend).score(
        batch.sequences,
        batch.prompt_lens,
        options,
        candidates=None if candidates is None else [c.numpy() for c in candidates],
    )
    return TeacherRows.from_results(results, candidates)


def loss_terms(
    name: str, rows: StudentRows, targets: torch.Tensor, batch: Batch, teacher: TeacherRows
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token value reported) of one of LOSSES, as the trainer builds it."""
    if name == "sft NLL":
        loss = -token_logprobs(rows, targets)
        return loss, loss.detach()
    if name == "reward":
        loss = reward_loss(rows, targets, batch, torch.tensor([0.5, -1.0, 2.0, 0.25]))
        return loss, loss.detach()
    return divergence(rows, targets, teacher, LOSSES[name])


def values_and_gradients(
    student: Student, rows_of, name: str, batch: Batch, teacher: TeacherRows
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    student.model.zero_grad(set_to_none=True)
    rows, targets = rows_of(student, batch)
    loss, reported = loss_terms(name, rows, targets, batch, teacher)
    (loss.sum() / loss.numel()).backward()
    gradients = {n: p.grad.clone() for n, p in student.model.named_parameters()}
    student.model.zero_grad(set_to_none=True)
    return loss.detach(), reported, gradients


def chunked(chunk_rows: int):
    """The trainer's computation: body to the completion rows, output layer per chunk."""

    def rows_of(student: Student, batch: Batch) -> tuple[StudentRows, torch.Tensor]:
        student.loss_chunk_rows = chunk_rows
        return student.completion_rows(batch)

    return rows_of


def assert_same(got, expected) -> None:
    for a, b in zip(got[:2], expected[:2], strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert got[2].keys() == expected[2].keys()
    for name, gradient in expected[2].items():
        torch.testing.assert_close(got[2][name], gradient, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("chunk_rows", CHUNKS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_and_its_gradients_equal_the_full_computation_at_any_chunk_size(
    student, backend, batch, name, chunk_rows
):
    objective = LOSSES[name] or make_objective("jsd")
    candidates = None
    if objective.candidates:
        candidates = student_candidates(student, batch, objective.candidates)
    teacher = teacher_rows(backend, batch, objective, candidates)
    expected = values_and_gradients(student, full_rows, name, batch, teacher)
    got = values_and_gradients(student, chunked(chunk_rows), name, batch, teacher)
    assert got[0].shape == (int(batch.loss_mask.sum()),)
    assert_same(got, expected)
    assert expected[2]["lm_head.weight"][student.vocab :].abs().max() == 0  # padded rows: no say


def test_the_output_layer_sees_completion_rows_only_a_chunk_at_a_time(student, backend, batch):
    seen: list[tuple[int, ...]] = []
    hook = student.model.lm_head.register_forward_hook(
        lambda module, inputs, output: seen.append(tuple(inputs[0].shape))
    )
    try:
        teacher = teacher_rows(backend, batch, LOSSES["JSD(0.5)"], None)
        values_and_gradients(student, chunked(5), "JSD(0.5)", batch, teacher)
    finally:
        hook.remove()
    hidden = student.model.config.hidden_size
    # 23 rows in chunks of 5, in the forward and again in the backward; never [B, L, H]
    assert sorted(seen) == [(3, hidden)] * 2 + [(5, hidden)] * 8


def test_the_students_own_candidates_are_its_top_ids_at_completion_rows(student, batch):
    rows, _ = full_rows(student, batch)
    expected = rows.states.topk(4, dim=-1).indices
    for chunk_rows in (0, 5):
        student.loss_chunk_rows = chunk_rows
        got = torch.cat(student_candidates(student, batch, 4))
        assert torch.equal(got, expected)


def test_a_soft_capped_student_gemma2_is_trained_through_its_output_layer(student, backend, batch):
    model = soft_capped_gemma2(student.model.config.vocab_size, layers=1)
    assert output_layer_splits_off(model.eval())  # OutputLayer reproduces its soft-capping
    gemma = Student(model, student.tokenizer, student.eos_ids, student.pad_id)
    teacher = teacher_rows(backend, batch, LOSSES["JSD(0.5)"], None)
    expected = values_and_gradients(gemma, full_rows, "JSD(0.5)", batch, teacher)
    got = values_and_gradients(gemma, chunked(5), "JSD(0.5)", batch, teacher)
    assert_same(got, expected)


class DoubledLogits(LlamaForCausalLM):
    """A forward that changes the logits after the output layer in an unknown way."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_a_student_whose_forward_rescales_its_logits_unknown_way_is_read_from_its_logits(
    student, backend, batch, caplog
):
    model = DoubledLogits(student.model.config).eval()
    model.load_state_dict(student.model.state_dict())
    with caplog.at_level(logging.WARNING, logger="student_trainer.student"):
        assert not output_layer_splits_off(model)
    assert "reads model(...).logits" in caplog.text
    odd = Student(model, student.tokenizer, student.eos_ids, student.pad_id, rows_only=False)
    teacher = teacher_rows(backend, batch, LOSSES["JSD(0.5)"], None)
    expected = values_and_gradients(odd, full_rows, "JSD(0.5)", batch, teacher)
    got = values_and_gradients(odd, chunked(5), "JSD(0.5)", batch, teacher)
    assert_same(got, expected)


def test_a_negative_chunk_size_is_refused_by_its_key():
    with pytest.raises(ConfigError, match=r"^student\.loss_chunk_rows"):
        load_config(None, ["method.name=sft", "student.loss_chunk_rows=-1"])
    assert load_config(None, ["method.name=sft", "student.loss_chunk_rows=0"])


MEMORY_SCRIPT = """
import json, resource, sys
import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from student_trainer.objective import token_logprobs
from student_trainer.rollouts import build_batch
from student_trainer.student import Student

vocab, rows, chunk_rows = (int(a) for a in sys.argv[1:4])
words = {f"t{i}": i for i in range(vocab)}
tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, "t0")))
config = LlamaConfig(vocab_size=vocab + 64, hidden_size=16, intermediate_size=32,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     max_position_embeddings=4096)
torch.manual_seed(0)
model = LlamaForCausalLM(config)
prompts = [[1] * 50, [1] * 50]
batch = build_batch(prompts, [torch.randint(3, vocab, (rows // 2,)).tolist() for _ in prompts],
                    eos_ids={2}, pad_id=0)
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {}
# the chunked path first: the process's peak only grows
for path, chunk, rows_only in (("chunked", chunk_rows, True), ("full", 0, False)):
    student = Student(model, tokenizer, frozenset({2}), 0, chunk, rows_only=rows_only)
    before = peak_mb()  # the model loaded: what the step adds to the process's peak
    rows_, targets = student.completion_rows(batch)
    loss = -token_logprobs(rows_, targets).mean()
    loss.backward()
    out[path + "_mb"] = peak_mb() - before
    out[path + "_loss"] = float(loss.detach())
    out[path + "_grad"] = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
out["grad_diff"] = float((out.pop("chunked_grad") - out.pop("full_grad")).abs().max())
print(json.dumps(out))
"""


def test_a_131k_vocabulary_trains_without_materialising_its_logits():
    """1,100 completion rows x 131,072 tokens: float32 logits are 550 MB, their gradient as
    much again. A step (forward, token NLL, backward) in 64-row chunks adds under a quarter
    of the logits alone to the process's peak; the full path, measured the same way, adds
    more than the logits."""
    vocab, rows = 131_072, 1_100
    logits_mb = rows * vocab * 4 / 2**20
    # glibc keeps a freed block under its mmap threshold (dynamic, up to 32 MB) in the heap
    # and RSS would count it as live: a fixed threshold returns every large tensor on free
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    completed = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(vocab), str(rows), "64"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
    )
    assert completed.returncode == 0, completed.stderr
    out = json.loads(completed.stdout)
    assert out["chunked_mb"] < logits_mb / 4, out
    assert out["full_mb"] > logits_mb, out  # the measurement sees an [N, V] when there is one
    assert abs(out["chunked_loss"] - out["full_loss"]) < ATOL, out
    assert out["grad_diff"] < ATOL, out
