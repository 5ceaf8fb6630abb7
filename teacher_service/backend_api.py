"""What a backend must provide: the contract the engine, `serve()` and the dialects rely on.

HFBackend (backend.py) computes everything from a local model; the remote backends
(remote.py) ask an upstream server and offer fewer capabilities. The engine refuses,
naming the capability, whatever the backend's `capabilities` leave out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import torch

from causal_lm.sampling import Completion, SamplingOptions
from teacher_client import TeacherInfo
from teacher_service import __version__
from teacher_service.config import Limits
from teacher_service.scoring import ScoreOptions, SequenceScores


class Capability(str, Enum):
    """What a backend can compute; Info reports the values (protos/teacher.proto)."""

    TARGET = "target"  # the actual tokens' log-probs
    TOPK = "topk"  # the k most likely tokens and their log-probs
    CANDIDATES = "candidates"  # log-probs of caller-chosen token ids
    FULL = "full"  # the whole [T, V] distribution
    RANKS = "ranks"  # the actual token's rank over the vocabulary (vLLM dialect)
    TEMPERATURE = "temperature"  # log-probs at a temperature other than 1
    GENERATE = "generate"  # sampled completions


@dataclass
class ScoreItem:
    """One sequence to score (validated: ids in the vocabulary, 1 <= score_from < len)."""

    token_ids: torch.Tensor  # int64 [L]
    score_from: int
    options: ScoreOptions
    candidate_ids: torch.Tensor | None = None  # int64 [L - score_from, m] or [m]
    # also sample the token after the sequence, from the same forward pass (vLLM's
    # max_tokens = 1 beside prompt_logprobs): the options and this item's own generator
    sample_next: tuple[SamplingOptions, torch.Generator | None] | None = None
    field: str = "sequence"  # its path in the caller's terms, for a backend's own refusals

    @property
    def forward_len(self) -> int:
        """Tokens fed to the model: the last token is only a target, never an input, unless
        the token after it is sampled too."""
        return int(self.token_ids.numel()) - (0 if self.sample_next else 1)


@dataclass(frozen=True)
class ForwardTokens:
    """What one batch's forwards ran, for /metrics and benchmarks."""

    computed: int  # every position the body ran: padding included, a shared prefix once
    padding: int  # of those, positions that were only padding


@dataclass
class ScoredBatch:
    """What Backend.score_batch returns: the scores and what the forwards that computed
    them ran, together (as vLLM's engine returns a step's outputs with its stats), so no
    caller has to read it off counters another call may have moved meanwhile."""

    scores: list[SequenceScores]  # one per item, in order
    forward_tokens: ForwardTokens | None  # None: an upstream ran the forwards, unseen


@runtime_checkable
class Backend(Protocol):
    """A model the service can serve: its description, scoring and generation (isinstance
    checks that every member is there, not their types)."""

    name: str  # Info.backend: "huggingface", "openai", "tgi"
    model_id: str
    vocab_size: int  # the tokenizer's real vocabulary (ids are < vocab_size)
    max_seq_len: int
    bos_token_id: int  # -1 when the tokenizer has none
    eos_token_id: int
    pad_token_id: int
    eos_ids: frozenset[int]  # every id that ends a completion
    tokenizer_fingerprint: str
    tokenizer: Any  # a transformers tokenizer: the dialects that take text use it
    device: torch.device | str
    model_dtype: str
    capabilities: tuple[Capability, ...]
    # True: the model runs here, so it samples while scoring (ScoreItem.sample_next) and
    # draws from the torch generators the engine makes on `device`; False: an upstream
    # samples, seeded by SamplingOptions.seed
    samples_while_scoring: bool

    def score_batch(self, items: list[ScoreItem]) -> ScoredBatch:
        """One result per item, in order, and what the forwards ran; runs on the model
        worker thread."""
        ...

    def generate(
        self,
        prompts: list[list[int]],
        options: SamplingOptions,
        generator: torch.Generator | None,
    ) -> list[Completion]:
        """One completion per prompt; `generator` comes from sampling.new_generator."""
        ...


def describe(backend: Backend, limits: Limits | None = None) -> TeacherInfo:
    """What Info says about a backend served with `limits` (None: in-process, no limits: 0)."""
    reported = ("max_batch_tokens", "max_tokens_per_request", "max_sequences_per_request")
    reported += ("max_message_bytes",)
    return TeacherInfo(
        model_id=backend.model_id,
        vocab_size=backend.vocab_size,
        tokenizer_fingerprint=backend.tokenizer_fingerprint,
        max_seq_len=backend.max_seq_len,
        bos_token_id=None if backend.bos_token_id < 0 else backend.bos_token_id,
        eos_token_id=None if backend.eos_token_id < 0 else backend.eos_token_id,
        pad_token_id=None if backend.pad_token_id < 0 else backend.pad_token_id,
        backend=backend.name,
        device=str(backend.device),
        model_dtype=backend.model_dtype,
        capabilities=tuple(capability.value for capability in backend.capabilities),
        server_version=__version__,
        **{name: getattr(limits, name) if limits else 0 for name in reported},
    )
