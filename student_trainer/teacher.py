"""The teacher as the trainer sees it: the service's client, or the same model in-process.

Both offer `score`, `generate` and `check_tokenizer` with the semantics of DESIGN.md, so
the loop does not know which one it talks to. The in-process teacher exists for
benchmarks (service vs same-process teacher) and for exact, network-free tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from teacher_client import (
    GenerateResult,
    ScoreResult,
    TeacherClient,
    TeacherInfo,
    compare_tokenizer,
)
from teacher_service.backend import HFBackend, ScoreItem
from teacher_service.codec import torch_dtype
from teacher_service.sampling import SamplingOptions, new_generator
from teacher_service.scoring import ScoreOptions


class InProcessTeacher:
    """An HFBackend called directly: one forward per call, no batching across callers."""

    runs_in_process = True  # the trainer scores in its own thread, without overlap

    def __init__(self, backend: HFBackend) -> None:
        self.backend = backend

    @classmethod
    def load(cls, model_dir: str, device: str = "cpu") -> InProcessTeacher:
        return cls(HFBackend.load(model_dir, device=device, dtype="float32"))

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        score_from: Sequence[int],
        *,
        top_k: int,
        candidates: Any = None,
        full: bool = False,
        temperature: float = 1.0,
        dtype: str = "float32",
    ) -> list[ScoreResult]:
        """The service's Score semantics, unvalidated (the trainer builds valid requests)."""
        options = ScoreOptions(
            top_k=top_k, full=full, temperature=temperature, dtype=torch_dtype(dtype)
        )
        items = [
            ScoreItem(
                torch.tensor(list(seq), dtype=torch.long),
                start,
                options,
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
            for s in self.backend.score_batch(items)
        ]

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

    def check_tokenizer(self, tokenizer: Any) -> TeacherInfo:
        info = TeacherInfo(
            model_id=self.backend.model_id,
            vocab_size=self.backend.vocab_size,
            tokenizer_fingerprint=self.backend.tokenizer_fingerprint,
            max_seq_len=self.backend.max_seq_len,
            bos_token_id=_optional_id(self.backend.bos_token_id),
            eos_token_id=_optional_id(self.backend.eos_token_id),
            pad_token_id=_optional_id(self.backend.pad_token_id),
            backend="in-process",
            device=str(self.backend.device),
            model_dtype=self.backend.model_dtype,
            max_batch_tokens=0,
            max_tokens_per_request=0,
            max_sequences_per_request=0,
            max_message_bytes=0,
            capabilities=self.backend.capabilities,
            server_version="",
        )
        compare_tokenizer(info, tokenizer)
        return info

    def close(self) -> None:
        pass


def _optional_id(token_id: int) -> int | None:
    return None if token_id < 0 else token_id


def _numpy(tensor: torch.Tensor | None):
    if tensor is None:
        return None
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def connect(
    address: str, in_process: str, *, timeout: float, device: str = "cpu", **tls: Any
) -> Teacher:
    """The in-process teacher when a model directory is given, else the service's client
    (`tls`: TeacherClient's tls, tls_ca, tls_cert, tls_key)."""
    if in_process:
        return InProcessTeacher.load(in_process, device=device)
    return TeacherClient(address, timeout=timeout, **tls)


# what the trainer talks to: both offer score / generate / check_tokenizer / close
Teacher = TeacherClient | InProcessTeacher
