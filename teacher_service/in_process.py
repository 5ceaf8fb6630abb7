"""The teacher in the caller's own process: the service's one entry point for a trainer.

A trainer that runs the teacher model itself (benchmarks of service vs same-process
teacher, exact network-free tests) imports this module and nothing else of the service.
`InProcessTeacher` calls the HFBackend directly, with the Score and Generate semantics of
docs/design.md, and returns the client's own result types, so a trainer handles its
answers exactly as it handles the service's.

The model kernels a trainer shares with the service (sampling, the output layer, eos ids,
devices, threads) are not here: they live in `causal_lm`, which neither owns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from causal_lm.sampling import SamplingOptions, new_generator
from teacher_client import (
    GenerateResult,
    ScoreOptions,
    ScoreResult,
    TeacherInfo,
    compare_tokenizer,
)
from teacher_service import scoring
from teacher_service.backend import HFBackend
from teacher_service.backend_api import ScoreItem, describe

__all__ = ["InProcessTeacher"]


class InProcessTeacher:
    """An HFBackend called directly: one forward per call, no batching across callers."""

    def __init__(self, backend: HFBackend) -> None:
        self.backend = backend

    @classmethod
    def load(
        cls, model_dir: str | Path, device: str = "cpu", *, deterministic: bool = False
    ) -> InProcessTeacher:
        """`deterministic`: `serve --deterministic`'s batch-invariant scores (every sequence
        of a call in a forward of its own)."""
        return cls(
            HFBackend.load(model_dir, device=device, dtype="float32", deterministic=deterministic)
        )

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        score_from: Sequence[int],
        options: ScoreOptions,
        *,
        candidates: Any = None,
    ) -> list[ScoreResult]:
        """The service's Score semantics, unvalidated (the trainer builds valid requests);
        `candidates`: None or one id list per sequence. The caller's autocast (a student's
        bf16 forward asks for its teacher's scores inside it) does not reach the teacher:
        it computes in its own dtype, as the service does."""
        row_options = scoring.ScoreOptions.from_client(options)
        items = [
            ScoreItem(
                torch.tensor(list(seq), dtype=torch.long),
                start,
                row_options,
                None if candidates is None else torch.as_tensor(candidates[i], dtype=torch.long),
            )
            for i, (seq, start) in enumerate(zip(sequences, score_from))
        ]
        return [
            ScoreResult(
                target_logprobs=_numpy(s.target_logprobs),
                topk_ids=_numpy(s.topk_ids),
                topk_logprobs=_numpy(s.topk_logprobs),
                candidate_logprobs=_numpy(s.candidate_logprobs),
                full_logprobs=_numpy(s.full_logprobs),
            )
            for s in self._score_batch(items)
        ]

    def _score_batch(self, items: list[ScoreItem]) -> list[scoring.SequenceScores]:
        with torch.autocast(self.backend.device.type, enabled=False):
            return self.backend.score_batch(items).scores

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[GenerateResult]:
        options = SamplingOptions(max_new_tokens, temperature, top_p, seed)
        generator = new_generator(options, self.backend.device)
        completions = self.backend.generate([list(p) for p in prompts], options, generator)
        return [GenerateResult(c.token_ids, c.finish_reason) for c in completions]

    def info(self) -> TeacherInfo:
        """What the service's Info would say about this model (no service limits apply)."""
        return dataclasses.replace(describe(self.backend), backend="in-process")

    def check_tokenizer(self, tokenizer: Any) -> TeacherInfo:
        """info(), after refusing a tokenizer that assigns ids differently (as the client)."""
        info = self.info()
        compare_tokenizer(info, tokenizer)
        return info


def _numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    if tensor is None:
        return None
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
