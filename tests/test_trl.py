"""TRL's own DistillationTrainer with the service as its teacher (teacher_client.trl).

The training run happens where a TRL user's would: in a venv of its own (`make trl-venv`:
torch, trl==1.16.0 and the client distribution with its [trl] extra, no vLLM, not the
project), run from `/` so that nothing of the checkout is importable. It trains the tiny
student (64 padded output rows past its 512-token tokenizer) against the tiny teacher
served here over gRPC, and checks the loss of one batch against an independent
computation from both models' full distributions. The loss function itself is held equal
to the service trainer's own `sparse_generalized_jsd` here, in the main venv.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
TRL_PYTHON = ROOT / ".cache" / "trl-venv" / "bin" / "python"
STEPS = 6
ACCUMULATED_STEPS = 3
TOP_K = 8

# The independent computation both TRL scripts (this one's and test_trl_losses.py's) hold
# the adapter's loss to: each sampled completion's rows from unpadded forwards of both
# models over the real vocabulary, in float64, on the teacher's top-k plus one tail bucket.
TOPK_TAIL_REFERENCE = """
import torch


def topk_tail_rows(student, teacher, inputs, vocab, top_k, temperature):
    \"\"\"(q, p): the student's and the teacher's [T, top_k + 1] of each completion.\"\"\"
    for row in range(inputs["prompt_ids"].shape[0]):
        prompt = inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()]
        completion = inputs["completion_ids"][row][inputs["completion_mask"][row].bool()]
        ids = torch.cat([prompt, completion]).unsqueeze(0)
        rows = slice(len(prompt) - 1, ids.shape[1] - 1)  # logits predicting the completion
        with torch.no_grad():
            s = student(ids).logits[0, rows, :vocab].double() / temperature
            t = teacher(ids).logits[0, rows, :vocab].double() / temperature
        q, p = torch.softmax(s, -1), torch.softmax(t, -1)
        support = p.topk(top_k, dim=-1).indices
        p_s, q_s = p.gather(-1, support), q.gather(-1, support)
        yield (
            torch.cat([q_s, 1 - q_s.sum(-1, keepdim=True)], -1),
            torch.cat([p_s, 1 - p_s.sum(-1, keepdim=True)], -1),
        )


def kl(a, b):
    return (a * (a / b).log()).sum(-1)
"""

TRL_SCRIPT = (
    TOPK_TAIL_REFERENCE
    + """
import dataclasses, importlib.util, json, math, sys, tempfile
import numpy as np
import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DistillationConfig

import teacher_client
from teacher_client import ScoreOptions, TeacherClient
from teacher_client.trl import TeacherServiceDistillationTrainer, score_in_chunks

address, teacher_dir, student_dir, out_path = sys.argv[1:5]
steps, accumulated, top_k = map(int, sys.argv[5:8])
PROMPTS = [
    "Ada has 12 apples. Ben gives Ada 3 more, so Ada has",
    "Cleo has 40 marbles. Cleo loses 7 of them, so Cleo has",
    "Dara buys 5 books. Emil gives Dara 9 books, so Dara has",
    "Fay has 101 coins. Fay sells 20 of them to Gus, so Gus has",
    "Hana finds 3 shells. Ivo finds 8 shells, so they have",
    "Juno has 66 stamps. Juno gives away 6 of them, so Juno has",
    "Ben has 250 tickets. Ben counts 50 of them, so Ben has",
    "Emil has 9 pencils. Ada gives Emil 11 pencils, so Emil has",
]
BETA, TEMPERATURE = 0.5, 0.9


class Losses(TrainerCallback):
    def __init__(self):
        self.values = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.values.append(logs["loss"])


class Recording(TeacherServiceDistillationTrainer):
    \"\"\"Records the largest completion id sampled (padded rows start at 512).\"\"\"

    max_sampled_id = -1

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        sampled = out["completion_ids"][out["completion_mask"].bool()]
        self.max_sampled_id = max(self.max_sampled_id, int(sampled.max()))
        return out


tokenizer = AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
result = {
    "vllm_installed": importlib.util.find_spec("vllm") is not None,
    "teacher_client_file": teacher_client.__file__,
    "trl_version": trl.__version__,
    "student_rows": student.get_output_embeddings().weight.shape[0],
}

# The control: sampled as TRL would without the adapter, from a model whose generation config
# does not suppress its padded rows (the project's own models now do; a user's may not), the
# student emits padded ids.
torch.manual_seed(0)
batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
with torch.no_grad():
    raw = student.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           do_sample=True, max_new_tokens=8, top_k=0, suppress_tokens=[],
                           pad_token_id=tokenizer.pad_token_id)
result["unsuppressed_max_id"] = int(raw[:, batch["input_ids"].shape[1]:].max())


def train(client, out_dir, steps, accumulation):
    # TRL with the service as teacher: 16 samples a step, in `accumulation` micro-batches
    losses = Losses()
    # 16 samples a step at lr 3e-2: the loss falls steadily (0.111 -> 0.091 in 6 steps here).
    args = DistillationConfig(
        output_dir=out_dir, per_device_train_batch_size=2 * len(PROMPTS) // accumulation,
        gradient_accumulation_steps=accumulation, max_steps=steps,
        learning_rate=3e-2, lr_scheduler_type="constant", warmup_steps=0, beta=BETA,
        temperature=TEMPERATURE, max_completion_length=8, seed=0, logging_steps=1,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        shuffle_dataset=False,
    )
    trainer = Recording(
        model=AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
        teacher=client, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}), callbacks=[losses],
        top_k=top_k,
    )
    trainer.train()
    return trainer, losses.values


with tempfile.TemporaryDirectory() as out_dir, TeacherClient(address, timeout=60) as client:
    # The same steps in two micro-batches each: TRL splits and shuffles the teacher's
    # answer with the samples it buffers, and the losses are the same.
    _, result["accumulated_losses"] = train(client, out_dir, accumulated, accumulation=2)
    trainer, result["losses"] = train(client, out_dir, steps, accumulation=1)
    result["max_sampled_id"] = trainer.max_sampled_id
    result["suppress_tokens"] = trainer.generation_config.suppress_tokens
    result["vocab_size"] = trainer.teacher_vocab_size

    # One more batch, its loss against an independent computation: both models' full
    # distributions over the real vocabulary (unpadded forwards, then float64), the teacher's
    # top-k support plus one tail bucket, the generalized JSD written out.
    trained = trainer.model.eval()
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS[:4]])
    with torch.no_grad():
        loss, _, count = trainer._compute_loss(trained, inputs, None)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    vocab, total, tokens = trainer.teacher_vocab_size, 0.0, 0
    for q_b, p_b in topk_tail_rows(trained, teacher, inputs, vocab, top_k, TEMPERATURE):
        m = BETA * p_b + (1 - BETA) * q_b
        total += float((BETA * kl(p_b, m) + (1 - BETA) * kl(q_b, m)).sum())
        tokens += len(q_b)
    result["batch_loss"] = float(loss)
    result["batch_tokens"] = int(count)
    result["reference_loss"] = total / tokens
    result["reference_tokens"] = tokens

    # A generation batch bigger than the server's per-request limits goes in several
    # requests, answered in order.
    limits = dict(max_sequences_per_request=3, max_tokens_per_request=60)
    sequences = [tokenizer(p)["input_ids"] for p in PROMPTS]
    starts = [len(s) // 2 for s in sequences]
    small = dataclasses.replace(trainer.teacher_info, **limits)
    chunked = score_in_chunks(client, sequences, starts, small, ScoreOptions(top_k=top_k))
    whole = client.score(sequences, starts, top_k=top_k)
    result["chunked_equal"] = len(chunked) == len(whole) and all(
        np.array_equal(a.topk_ids, b.topk_ids)
        and np.allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)
        for a, b in zip(chunked, whole)
    )

with open(out_path, "w") as out:
    json.dump(result, out)
"""
)


def grpc_scores(http_url: str) -> float:
    """teacher_requests_total{frontend="grpc", method="Score", status="OK"} right now."""
    text = httpx.get(f"{http_url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "teacher_requests_total" and (
                labels.get("frontend"),
                labels.get("method"),
                labels.get("status"),
            ) == ("grpc", "Score", "OK"):
                return sample.value
    return 0.0


def run_in_trl_venv(script: str, *arguments: object) -> dict:
    """Run `script` as a TRL user's process would (the trl venv's Python, from `/`, so
    nothing from the checkout is on sys.path: only what the venv installed) with
    `arguments`: the service's address, the teacher's and the student's directories, the
    file it writes its JSON result to, then its own. Returns that result."""
    if not TRL_PYTHON.exists():
        pytest.fail(
            f"{TRL_PYTHON} is missing: run `make test` (or `make trl-venv`) to build the "
            "isolated venv with trl==1.16.0 and the client's [trl] extra"
        )
    run = subprocess.run(
        [str(TRL_PYTHON), "-c", script, *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd="/",
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(Path(arguments[3]).read_text())


@pytest.fixture(scope="module")
def trl_run(server, tiny_model_dir, student_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("trl") / "result.json"
    before = grpc_scores(server.http_url)
    arguments = (server.address, tiny_model_dir, student_model_dir, out, STEPS, ACCUMULATED_STEPS)
    result = run_in_trl_venv(TRL_SCRIPT, *arguments, TOP_K)
    result["grpc_scores"] = grpc_scores(server.http_url) - before
    return result


def test_trl_trains_against_the_service_without_vllm(trl_run):
    """TRL's loop ran every step, from the installed client, with no vLLM, and learned."""
    assert trl_run["trl_version"] == "1.16.0"
    assert not trl_run["vllm_installed"]
    assert "/.cache/trl-venv/" in trl_run["teacher_client_file"]  # installed, not the checkout
    losses = trl_run["losses"]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] and sum(losses[-2:]) < sum(losses[:2]), losses


def test_the_teacher_is_called_over_grpc(trl_run):
    # one Score per generation batch: each step of both runs, then the checked batch
    assert trl_run["grpc_scores"] >= ACCUMULATED_STEPS + STEPS + 1


def test_gradient_accumulation_reuses_the_teachers_answer(trl_run):
    """2 micro-batches of 8 give the losses of 1 batch of 16 (same samples, same seed):
    the teacher's answer travels with the samples through TRL's shuffle and split."""
    accumulated = trl_run["accumulated_losses"]
    assert len(accumulated) == ACCUMULATED_STEPS
    assert accumulated == pytest.approx(trl_run["losses"][:ACCUMULATED_STEPS], rel=1e-4)


def test_padded_rows_are_never_sampled(trl_run):
    """Without the suppression, step 1 already fails: the service refuses an id >= 512
    (INVALID_ARGUMENT, "outside the vocabulary"; HTTP 422 in the vLLM dialect)."""
    vocab, rows = trl_run["vocab_size"], trl_run["student_rows"]
    assert rows > vocab  # the tiny student has padded rows...
    assert trl_run["unsuppressed_max_id"] >= vocab  # ...which plain sampling emits
    assert trl_run["suppress_tokens"] == list(range(vocab, rows))
    assert trl_run["max_sampled_id"] < vocab


def test_a_batch_over_the_request_limits_is_scored_in_chunks(trl_run):
    assert trl_run["chunked_equal"]


def test_the_loss_equals_an_independent_computation(trl_run):
    assert trl_run["batch_tokens"] == trl_run["reference_tokens"] > 0
    assert trl_run["batch_loss"] == pytest.approx(trl_run["reference_loss"], rel=1e-4, abs=1e-6)
