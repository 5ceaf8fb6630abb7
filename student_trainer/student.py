"""The student: a causal LM and its tokenizer, loaded from a model directory or checkpoint.

The tokenizer decides the vocabulary: logits past it (padded embedding rows, as real
checkpoints have) are cut before any loss. A completion ends at the tokenizer's eos or at
any eos the model's generation config adds; a tokenizer without a pad token pads with an
eos (the loss mask comes from lengths, so that is safe: rollouts.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from student_trainer.config import ConfigError
from student_trainer.rollouts import Batch
from teacher_service.in_process import eos_token_ids


@dataclass
class Student:
    model: torch.nn.Module
    tokenizer: Any
    eos_ids: frozenset[int]
    pad_id: int

    @property
    def vocab(self) -> int:
        return len(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, batch: Batch, module: torch.nn.Module | None = None) -> torch.Tensor:
        """[B, L, vocab] for a batch; `module` is the model as trained (DDP) when it differs."""
        out = (module or self.model)(
            input_ids=batch.input_ids.to(self.device),
            attention_mask=batch.attention_mask.to(self.device),
        )
        return out.logits[..., : self.vocab]


def load_student(source: str | Path, dtype: str, device: torch.device) -> Student:
    """The model directory `source` (student.model, or a checkpoint) in `dtype`, on `device`."""
    if not (Path(source) / "config.json").is_file():
        raise ConfigError(f"student.model: {source} is not a model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=getattr(torch, dtype), local_files_only=True
    ).to(device)
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ConfigError(f"student.model: {rows} output rows < {len(tokenizer)} tokens")
    eos_ids = frozenset(eos_token_ids(model, tokenizer))
    pad = tokenizer.pad_token_id
    return Student(model, tokenizer, eos_ids, pad if pad is not None else min(eos_ids))
