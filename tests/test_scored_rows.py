"""Scoring only the asked rows, in chunks, with shared prefixes run once: every path gives
what one unpadded forward of each sequence alone gives (`model(...).logits`), in float32
to 1e-5, whatever the options, the chunk size, the batch or the architecture."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaForCausalLM,
    masking_utils,
)

from causal_lm.output_layer import OutputLayer
from causal_lm.sampling import SamplingOptions
from teacher_service.backend import HFBackend
from teacher_service.backend_api import ScoreItem
from teacher_service.scoring import ScoreOptions
from tests.conftest import reference_logprobs, soft_capped_gemma2

ATOL = 1e-5
PROMPT_LEN = 40  # longer than forward.MIN_SHARED_TOKENS: its samples share it


def variant(backend: HFBackend, **flags) -> HFBackend:
    """The same model and tokenizer, scored another way."""
    rows_only, chunk_rows = flags.pop("rows_only", True), flags.pop("chunk_rows", None)
    other = HFBackend(backend.model, backend.tokenizer, model_id=backend.model_id, **flags)
    other.rows_only = other.rows_only and rows_only
    other.chunk_rows = chunk_rows or other.chunk_rows
    return other


def mixed_items(vocab: int, seed: int = 0) -> list[ScoreItem]:
    """A trainer's batch: 5 samples of one prompt, scored from inside the prompt and from
    the completion, candidates as [m] and as [T, m]; 3 samples of a shorter prompt (the
    prefixes differ in length); and two sequences of their own."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (PROMPT_LEN,), generator=g)
    options = ScoreOptions(top_k=5, full=True, temperature=0.7, ranks=True)
    items = []
    for n in range(5):
        ids = torch.cat([prompt, torch.randint(0, vocab, (6 + 3 * n,), generator=g)])
        score_from = (PROMPT_LEN - 4, PROMPT_LEN, PROMPT_LEN + 2)[n % 3]
        rows = len(ids) - score_from
        candidates = torch.randint(0, vocab, (rows, 4) if n % 2 else (3,), generator=g)
        items.append(ScoreItem(ids, score_from, options, candidates))
    short = torch.randint(0, vocab, (PROMPT_LEN // 2,), generator=g)
    for n in range(3):
        ids = torch.cat([short, torch.randint(0, vocab, (4 + 5 * n,), generator=g)])
        items.append(ScoreItem(ids, PROMPT_LEN // 2 - n, options))
    for length, score_from in ((25, 1), (33, 7)):
        ids = torch.randint(0, vocab, (length,), generator=g)
        items.append(ScoreItem(ids, score_from, options))
    return items


def check_against_whole_forwards(backend: HFBackend, items, results, atol=ATOL) -> None:
    for item, scores in zip(items, results):
        ids = item.token_ids.tolist()
        temperature = item.options.temperature
        reference = reference_logprobs(backend, ids, temperature)[item.score_from - 1 : -1]
        targets = item.token_ids[item.score_from :].unsqueeze(1)
        expected = reference.gather(1, targets).squeeze(1)
        torch.testing.assert_close(scores.target_logprobs, expected, atol=atol, rtol=0)
        torch.testing.assert_close(scores.full_logprobs, reference, atol=atol, rtol=0)
        top, top_ids = reference.topk(item.options.top_k, dim=-1)
        torch.testing.assert_close(scores.topk_logprobs, top, atol=atol, rtol=0)
        assert torch.equal(scores.topk_ids.long(), top_ids)
        assert (
            scores.target_ranks.tolist()
            == (reference > expected.unsqueeze(1)).sum(-1).add(1).tolist()
        )
        if item.candidate_ids is not None:
            ids_ = item.candidate_ids.expand(len(targets), -1)
            torch.testing.assert_close(
                scores.candidate_logprobs, reference.gather(1, ids_), atol=atol, rtol=0
            )


@pytest.mark.parametrize(
    "flags",
    [
        {"share_prefixes": True},
        {"share_prefixes": False},  # packed: short sequences share a row
        {"share_prefixes": False, "pack": False},  # padded to the longest
        {"chunk_rows": 3, "share_prefixes": True},  # chunks that cut sequences apart
        {"rows_only": False, "share_prefixes": False},  # today's path: every position's logits
    ],
    ids=["rows+shared", "rows+packed", "rows+padded", "rows+shared+small-chunks", "all-logits"],
)
def test_every_path_scores_what_a_whole_forward_of_each_sequence_gives(backend, flags):
    scorer = variant(backend, **flags)
    assert scorer.vocab_size < scorer.model.get_output_embeddings().weight.shape[0]  # padded
    items = mixed_items(scorer.vocab_size)
    check_against_whole_forwards(scorer, items, scorer.score_batch(items).scores)


def test_a_shared_prefix_runs_once_and_changes_no_result(backend):
    shared, alone = variant(backend, share_prefixes=True), variant(backend, share_prefixes=False)
    items = mixed_items(backend.vocab_size, seed=3)
    # a second request with other options in the same batch shares the prompt too
    other = ScoreOptions(top_k=2)
    items += [ScoreItem(item.token_ids, PROMPT_LEN, other) for item in items[:2]]
    with_sharing, without = shared.score_batch(items), alone.score_batch(items)
    for a, b in zip(with_sharing.scores, without.scores):
        torch.testing.assert_close(a.target_logprobs, b.target_logprobs, atol=ATOL, rtol=0)
        if a.full_logprobs is not None:
            torch.testing.assert_close(a.full_logprobs, b.full_logprobs, atol=ATOL, rtol=0)
    # 7 samples of a 40-token prompt: the prompt's tokens are computed once, not 7 times
    saved = without.forward_tokens.computed - with_sharing.forward_tokens.computed
    assert saved >= 5 * (PROMPT_LEN - 1)


def test_packing_short_sequences_into_shared_rows_computes_less_and_changes_no_result(backend):
    packed, padded = (variant(backend, share_prefixes=False, pack=p) for p in (True, False))
    assert packed.pack and not padded.pack  # the load-time check passed
    items = mixed_items(backend.vocab_size, seed=4)
    in_rows, in_padding = packed.score_batch(items), padded.score_batch(items)
    for a, b in zip(in_rows.scores, in_padding.scores):
        torch.testing.assert_close(a.full_logprobs, b.full_logprobs, atol=ATOL, rtol=0)
    real = sum(item.forward_len for item in items)
    assert real <= in_rows.forward_tokens.computed < in_padding.forward_tokens.computed
    for scored in (in_rows, in_padding):  # the counts: what ran = the sequences + padding
        tokens = scored.forward_tokens
        assert tokens.computed - tokens.padding == real


def test_an_attention_that_lets_packed_sequences_meet_is_padded_instead(
    backend, monkeypatch, caplog
):
    # what an attention without position-id packing does: one causal mask over the row
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda positions: None)
    with caplog.at_level(logging.WARNING):
        scorer = variant(backend, share_prefixes=False)
    assert not scorer.pack
    assert "packed sequences attend to each other" in caplog.text
    items = mixed_items(backend.vocab_size, seed=6)
    check_against_whole_forwards(scorer, items, scorer.score_batch(items).scores)


@pytest.mark.parametrize("share_prefixes", [True, False], ids=["shared", "packed"])
def test_the_token_sampled_after_a_shared_prefix_or_in_a_packed_row_is_the_one_sampled_alone(
    backend, share_prefixes
):
    items = mixed_items(backend.vocab_size, seed=5)
    items = items[:5] + items[-2:]  # 5 samples of one prompt, two short ones that share a row
    for item in items:
        item.sample_next = (SamplingOptions(1, temperature=0.0), None)
        item.options = ScoreOptions(top_k=1)
    scored = variant(backend, share_prefixes=share_prefixes).score_batch(items).scores
    for item, scores in zip(items, scored):
        with torch.inference_mode():
            logits = backend.model(item.token_ids.unsqueeze(0)).logits[0, -1]
        assert scores.next_token_id == int(logits[: backend.vocab_size].argmax())


def test_a_soft_capped_architecture_gemma2_scores_its_own_logits(backend):
    model = soft_capped_gemma2(backend.model.config.vocab_size, layers=2)
    gemma = HFBackend(model, backend.tokenizer, model_id="tiny-gemma2")
    assert gemma.rows_only  # OutputLayer reproduces its soft-capping
    items = mixed_items(gemma.vocab_size)
    check_against_whole_forwards(gemma, items, gemma.score_batch(items).scores)


def test_the_output_layer_computes_the_real_vocabularys_logits_only(backend):
    model = backend.model
    padded_rows = model.get_output_embeddings().weight.shape[0]
    assert backend.vocab_size < padded_rows  # the tiny model pads its embedding, as real ones do
    ids = torch.arange(12) % backend.vocab_size
    with torch.inference_mode():
        expected = model(ids.unsqueeze(0)).logits[0, :, : backend.vocab_size]
        hidden = backend.body.hidden([ids])[0]
        logits = backend.output_layer(hidden)
        every_row = OutputLayer(model)(hidden)  # without a vocabulary: every output row
    assert logits.shape == (12, backend.vocab_size) and logits.is_contiguous()
    assert every_row.shape == (12, padded_rows)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(every_row[:, : backend.vocab_size], expected, atol=ATOL, rtol=0)


class DoubledLogits(LlamaForCausalLM):
    """A forward that changes the logits after the output layer in an unknown way."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_a_forward_that_rescales_its_logits_unknown_way_is_scored_from_its_logits(backend, caplog):
    model = DoubledLogits(backend.model.config).eval()
    model.load_state_dict(backend.model.state_dict())
    with caplog.at_level(logging.WARNING, logger="teacher_service.backend"):
        odd = HFBackend(model, backend.tokenizer, model_id="doubled")
    assert not odd.rows_only
    assert "scoring from model(...).logits over every position" in caplog.text
    items = mixed_items(odd.vocab_size)
    # logits twice as large: float32 rounds them twice as coarsely
    check_against_whole_forwards(odd, items, odd.score_batch(items).scores, atol=2 * ATOL)


MEMORY_SCRIPT = """
import json, resource, sys
import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from teacher_service.backend import HFBackend
from teacher_service.backend_api import ScoreItem
from causal_lm.output_layer import OutputLayer
from teacher_service.scoring import ScoreOptions

vocab, rows, length, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
words = {f"t{i}": i for i in range(vocab)}
tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, "t0")))
config = LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     max_position_embeddings=4096)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval().to(getattr(torch, dtype))
backend = HFBackend(model, tokenizer, model_id="wide", score_chunk_mb=32)
item = ScoreItem(torch.randint(0, vocab, (length,)), 1, ScoreOptions(top_k=8))
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {"rows_only": backend.rows_only}
before = peak_mb()  # the model loaded: what the scoring adds to the process's peak
(rows,) = backend.score_batch([item]).scores
out["rows_mb"] = peak_mb() - before
backend.rows_only = False
before = peak_mb()
(logits,) = backend.score_batch([item]).scores
out["logits_mb"] = peak_mb() - before
out["agree"] = float((rows.target_logprobs - logits.target_logprobs).abs().max())
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    "vocab, rows, dtype",
    [(131_072, 131_072, "float32"), (151_936, 152_064, "bfloat16")],
    ids=["131k-float32", "152k-padded-bfloat16"],
)
def test_a_100k_vocabulary_batch_is_scored_without_materialising_its_logits(vocab, rows, dtype):
    """2,100 rows x 131,072 tokens of float32 logits would be 1.1 GB: the chunked path's
    peak stays far under it; the every-position path, measured the same way, does not. A
    bfloat16 model of Qwen2's vocabulary (151,936 tokens, 152,064 output rows): each chunk
    is its bfloat16 logits, their float32 widening and the float32 log-probs, the padded
    rows never computed; model(...).logits holds every position's, in bfloat16."""
    length = 2_100
    full_mb = length * vocab * 4 / 2**20
    completed = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(vocab), str(rows), str(length), dtype],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
        # the peak of what is alive: with its threshold left to adapt, glibc keeps freed
        # blocks under 32 MB in its heap, and about one run in five of the bfloat16 case
        # (before this path too) peaked 1-2 GB higher with the same tensors
        env=os.environ | {"MALLOC_MMAP_THRESHOLD_": str(2**20)},
    )
    assert completed.returncode == 0, completed.stderr
    out = json.loads(completed.stdout)
    assert out["rows_only"]
    assert out["rows_mb"] < full_mb / 4, out
    logits_mb = length * rows * torch.finfo(getattr(torch, dtype)).bits / 8 / 2**20
    assert out["logits_mb"] > logits_mb, out  # the measurement sees a [L, V] when there is one
    assert out["agree"] < ATOL


def test_a_model_whose_cache_cannot_be_shared_is_scored_unshared(backend, monkeypatch, caplog):
    def refuse(self, indices):
        raise NotImplementedError("this cache cannot select rows")

    monkeypatch.setattr(DynamicCache, "batch_select_indices", refuse)
    with caplog.at_level(logging.WARNING, logger="teacher_service.backend"):
        unshareable = variant(backend, share_prefixes=True)
    assert unshareable.rows_only and not unshareable.share_prefixes
    assert "prefixes are not shared" in caplog.text
    items = mixed_items(unshareable.vocab_size)
    check_against_whole_forwards(unshareable, items, unshareable.score_batch(items).scores)
