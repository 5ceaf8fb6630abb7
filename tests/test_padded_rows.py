"""Padded output rows: plain `transformers` sampling from any model the project writes (the
committed models/, an export, a trimmed export) never draws an id the tokenizer lacks, and
`export --trim-vocab` gives the same distribution over the real tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_lab.tiny_model import TINY_STUDENT_SPEC, TinyModelSpec, build_tiny_model
from student_trainer.checkpoint import latest_checkpoint
from student_trainer.cli import main as cli_main
from student_trainer.student import export_student, load_student
from student_trainer.train import train
from tests.conftest import TEXTS
from tests.trainer_helpers import in_process, small_config

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted(p.parent for p in (ROOT / "models").glob("*/*/config.json"))
SEQUENCES = 1000
NEW_TOKENS = 16


def sampled_ids(model_dir: Path, **generate: object) -> tuple[torch.Tensor, int]:
    """SEQUENCES completions of <bos> by plain generate(do_sample=True, top_k=0) under the
    model's own generation config (`generate` overrides it), and the tokenizer's size."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = torch.full((SEQUENCES, 1), tokenizer.bos_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=0,
            max_new_tokens=NEW_TOKENS,
            **generate,
        )
    return out[:, 1:], len(tokenizer)


def log_probs(model_dir: Path, vocab: int) -> torch.Tensor:
    """log softmax over the first `vocab` rows of the model's logits on TEXTS (renormalised
    without any row past them)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    return torch.log_softmax(logits[..., :vocab], dim=-1)[batch["attention_mask"].bool()]


def output_shapes(model_dir: Path) -> tuple[int, int, int]:
    """(input embedding rows, output rows, config.vocab_size) as from_pretrained builds them."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = model.get_output_embeddings().weight.shape[0]
    return model.get_input_embeddings().weight.shape[0], rows, model.config.vocab_size


@pytest.fixture(scope="module")
def exports(tmp_path_factory, student_model_dir, backend) -> dict[str, Path]:
    """A one-step run's checkpoint, exported by the CLI as it is and with --trim-vocab."""
    root = tmp_path_factory.mktemp("exports")
    train(
        small_config(root / "run", student_model_dir, "optim.steps=1"), teacher=in_process(backend)
    )
    checkpoint = str(latest_checkpoint(root / "run"))
    cli_main(["export", checkpoint, str(root / "plain")])
    cli_main(["export", checkpoint, str(root / "trimmed"), "--trim-vocab"])
    return {"plain": root / "plain", "trimmed": root / "trimmed"}


def test_the_committed_models_are_found():
    assert len(COMMITTED) == 8, COMMITTED  # 3 teachers, 5 students


@pytest.mark.parametrize("model_dir", COMMITTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_plain_sampling_from_a_committed_model_stays_in_the_tokenizer(model_dir):
    ids, vocab = sampled_ids(model_dir)
    assert int((ids >= vocab).sum()) == 0


@pytest.mark.parametrize("kind", ["plain", "trimmed"])
def test_plain_sampling_from_an_export_stays_in_the_tokenizer(exports, kind):
    ids, vocab = sampled_ids(exports[kind])
    assert int((ids >= vocab).sum()) == 0


def test_without_suppress_tokens_the_export_draws_padded_rows(exports):
    """The check above can fail: the same sampling with the list emptied draws them."""
    ids, vocab = sampled_ids(exports["plain"], suppress_tokens=[])
    assert int((ids >= vocab).sum()) > 0


def test_the_trimmed_export_has_no_padded_row_and_the_same_real_token_log_probs(exports):
    vocab = len(AutoTokenizer.from_pretrained(exports["trimmed"]))
    assert output_shapes(exports["plain"]) == (vocab // 64 * 64 + 64,) * 3
    assert output_shapes(exports["trimmed"]) == (vocab,) * 3
    want = log_probs(exports["plain"], vocab)
    got = log_probs(exports["trimmed"], vocab)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(got.exp().sum(-1), torch.ones(len(got)), atol=1e-5)


def test_a_tied_model_trims_to_a_tied_output_layer(tmp_path, tiny_model_dir):
    spec = TinyModelSpec(**{**TINY_STUDENT_SPEC.__dict__, "tie_word_embeddings": True})
    tied = build_tiny_model(tmp_path / "tied", spec, tokenizer_from=tiny_model_dir)
    trimmed = export_student(tied, tmp_path / "trimmed", trim_vocab=True)
    model = AutoModelForCausalLM.from_pretrained(trimmed)
    vocab = len(AutoTokenizer.from_pretrained(trimmed))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert output_shapes(trimmed) == (vocab,) * 3
    assert torch.allclose(log_probs(trimmed, vocab), log_probs(tied, vocab), atol=1e-5, rtol=0)


# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`: theirs, not ours
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
def test_a_lora_checkpoint_exports_trimmed_with_the_adapted_log_probs(
    tmp_path, student_model_dir, backend
):
    """The adapters merged into the base weights, then the padded rows cut: over the real
    tokens, the adapted model's distribution (read through load_student, with peft)."""
    pytest.importorskip("peft")
    lora = ("student.lora.r=4", "student.lora.alpha=8", "optim.lr=0.05", "optim.steps=1")
    train(small_config(tmp_path / "run", student_model_dir, *lora), teacher=in_process(backend))
    checkpoint = latest_checkpoint(tmp_path / "run")
    trimmed = export_student(checkpoint, tmp_path / "trimmed", trim_vocab=True)
    adapted = load_student(checkpoint, "float32", torch.device("cpu")).model.eval()
    tokenizer = AutoTokenizer.from_pretrained(trimmed)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = adapted(**batch).logits[..., : len(tokenizer)]
    want = torch.log_softmax(logits, dim=-1)[batch["attention_mask"].bool()]
    assert output_shapes(trimmed) == (len(tokenizer),) * 3
    assert torch.allclose(log_probs(trimmed, len(tokenizer)), want, atol=1e-5, rtol=0)
