"""The engine's requests: plain data, built by each front end from its own request.

gRPC (frontends/grpc_api.py), the native HTTP API, the vLLM and TGI dialects
(frontends/http/) each turn what they received into these; the engine validates them
(validation.py) and answers in
SequenceScores / Completion, which each front end turns into its own response. `Names`
says what the caller calls each field, so a refusal names `prompt[1]` to a vLLM client
and `sequences[3].token_ids` to a gRPC one.
"""

from __future__ import annotations

from collections import abc
from dataclasses import dataclass, field

import numpy as np

from causal_lm.sampling import SamplingOptions


@dataclass(frozen=True)
class Names:
    """The caller's names for a request's fields (defaults: protos/teacher.proto's)."""

    sequences: str = "sequences"  # the list of sequences (or prompts)
    token_ids: str = ".token_ids"  # appended to a sequence's path
    score_from: str = ".score_from"
    candidate_ids: str = ".candidate_ids"
    max_new_tokens: str = "max_new_tokens"

    def item(self, n: int, path: str | None) -> str:
        """Sequence n's path: its own when the front end gave one, else `sequences[n]`."""
        return path if path is not None else f"{self.sequences}[{n}]"


PROMPT_NAMES = Names(sequences="prompts")


@dataclass(frozen=True)
class Sequence:
    """One sequence to score from `score_from` on (checked by validation, not here)."""

    token_ids: abc.Sequence[int] | np.ndarray
    score_from: int
    candidate_ids: np.ndarray | None = None  # int ids, [len - score_from, m] or [m]
    path: str | None = None  # the caller's name for it (default: names.sequences[n])


@dataclass(frozen=True)
class ScoreRequest:
    sequences: list[Sequence]
    top_k: int = 0
    full: bool = False
    temperature: float | None = None  # None: 1
    dtype: str = "float32"  # of the returned log-probs: float32, float16 or bfloat16
    ranks: bool = False  # also each actual token's rank (the vLLM dialect reports it)
    # also sample the token after each sequence from the same forward pass (sequence n
    # draws from its own generator, seeded seed + n); local backends only
    sample_next: SamplingOptions | None = None
    names: Names = field(default_factory=Names)


@dataclass(frozen=True)
class Prompt:
    token_ids: abc.Sequence[int] | np.ndarray
    path: str | None = None  # the caller's name for it (default: names.sequences[n])


@dataclass(frozen=True)
class GenerateRequest:
    prompts: list[Prompt]
    max_new_tokens: int
    temperature: float | None = None  # None: 1; 0 is greedy
    top_p: float | None = None  # None: 1
    seed: int | None = None  # None: 0
    ignore_eos: bool = False
    names: Names = PROMPT_NAMES
