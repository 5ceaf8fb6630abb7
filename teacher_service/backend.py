"""The Hugging Face backend: a local causal-LM directory, scored in padded batches.

Everything here runs on the model worker thread (see batcher.py); nothing here knows
about gRPC. A batch is right-padded: under a causal mask the padding sits after every
real position, so a sequence's log-probs do not depend on what it was batched with.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from teacher_client.fingerprint import tokenizer_fingerprint
from teacher_service.backend_api import Capability, ScoreItem
from teacher_service.codec import torch_dtype
from teacher_service.sampling import Completion, SamplingOptions, next_token, sample
from teacher_service.scoring import SequenceScores, score_rows

log = logging.getLogger(__name__)
DEFAULT_MAX_SEQ_LEN = 2048


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return resolved


class HFBackend:
    """A transformers causal LM and its tokenizer, loaded from a local directory: a
    backend_api.Backend with every capability."""

    name = "huggingface"
    capabilities = tuple(Capability)
    samples_while_scoring = True

    def __init__(self, model: torch.nn.Module, tokenizer, *, model_id: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = next(model.parameters()).device
        self.model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.vocab_size = len(tokenizer)
        logits_rows = model.get_output_embeddings().weight.shape[0]
        if self.vocab_size > logits_rows:
            raise ValueError(
                f"the tokenizer has {self.vocab_size} tokens but the model only {logits_rows} "
                "output rows: tokenizer and model do not belong together"
            )
        self.max_seq_len = _max_seq_len(model.config, tokenizer)
        self.bos_token_id = _id_or_minus_one(tokenizer.bos_token_id)
        self.eos_token_id = _id_or_minus_one(tokenizer.eos_token_id)
        self.pad_token_id = _id_or_minus_one(tokenizer.pad_token_id)
        self.eos_ids = frozenset(eos_token_ids(model, tokenizer))
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)

    @classmethod
    def load(
        cls, model_dir: str | Path, *, device: str = "auto", dtype: str = "float32"
    ) -> HFBackend:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {model_dir}: no config.json (not a model directory)")
        target = resolve_device(device)
        log.info("loading %s on %s in %s", path, target, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(dtype), local_files_only=True
        ).to(target)
        return cls(model, tokenizer, model_id=path.resolve().name)

    @torch.inference_mode()
    def score_batch(self, items: list[ScoreItem]) -> list[SequenceScores]:
        """One padded forward pass over all items, then each item's rows scored alone."""
        width = max(item.forward_len for item in items)
        input_ids = torch.zeros((len(items), width), dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            input_ids[row, : item.forward_len] = item.token_ids[: item.forward_len]
            attention_mask[row, : item.forward_len] = 1
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            use_cache=False,
        ).logits
        results = []
        for row, item in enumerate(items):
            length = int(item.token_ids.numel())
            candidates = item.candidate_ids
            scores = score_rows(
                logits[row, item.score_from - 1 : length - 1],
                item.token_ids[item.score_from :].to(self.device),
                self.vocab_size,
                item.options,
                None if candidates is None else candidates.to(self.device),
            )
            if item.sample_next is not None:
                options, generator = item.sample_next
                last = logits[row, length - 1 : length, : self.vocab_size]
                scores.next_token_id = int(
                    next_token(last, options.temperature, options.top_p, generator)
                )
            results.append(scores)
        return results

    def generate(
        self,
        prompts: list[list[int]],
        options: SamplingOptions,
        generator: torch.Generator | None,
    ) -> list[Completion]:
        """Complete one chunk of prompts; `generator` comes from sampling.new_generator."""
        pad = self.pad_token_id if self.pad_token_id >= 0 else max(self.eos_token_id, 0)
        return sample(
            self.model,
            prompts,
            options,
            vocab_size=self.vocab_size,
            eos_ids=self.eos_ids,
            pad_id=pad,
            generator=generator,
        )


def _id_or_minus_one(token_id: int | None) -> int:
    return -1 if token_id is None else int(token_id)


def eos_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """The tokenizer's eos plus any eos ids in the model's generation config."""
    ids = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
    generation_config = getattr(model, "generation_config", None)
    extra = getattr(generation_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    return ids


def _max_seq_len(config, tokenizer) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    return DEFAULT_MAX_SEQ_LEN
