"""The scoring math: teacher logits at the scored positions -> what docs/design.md specifies.

Pure tensor functions, so tests can hold them against the formulas. For a sequence with
score_from = s, row j is position i = s + j, predicted by the logits at position i - 1.
Rows are independent, so the rows of many sequences are scored together (`score_chunked`)
and split per sequence afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

import teacher_client
from teacher_service.codec import torch_dtype


@dataclass(frozen=True)
class ScoreOptions:
    """What one request asks for; shared by all of its sequences. The scoring math's view
    of the client's `teacher_client.ScoreOptions`: the dtype as torch's, and what only the
    service's own dialects ask for (ranks)."""

    top_k: int = 0
    full: bool = False
    temperature: float = 1.0
    dtype: torch.dtype = torch.float32
    ranks: bool = False  # also the actual token's 1-based rank (the vLLM dialect reports it)

    @classmethod
    def from_client(cls, options: teacher_client.ScoreOptions) -> ScoreOptions:
        """The client's options (wire dtype names) as the scoring math takes them."""
        return cls(
            top_k=options.top_k,
            full=options.full,
            temperature=options.temperature,
            dtype=torch_dtype(options.dtype),
        )


@dataclass
class SequenceScores:
    """The rows of one sequence (or of several, concatenated), in the requested dtype (ids in
    int32): on the model's device from score_rows, on the CPU once the backend returns them."""

    target_logprobs: torch.Tensor  # [T]
    topk_ids: torch.Tensor | None  # [T, k]
    topk_logprobs: torch.Tensor | None  # [T, k]
    candidate_logprobs: torch.Tensor | None  # [T, m]
    full_logprobs: torch.Tensor | None  # [T, V]
    target_ranks: torch.Tensor | None = None  # [T] int32: 1 + tokens strictly more likely
    next_token_id: int | None = None  # the token sampled after the sequence, when asked


HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class LogProbs:
    """log p[t, v] = source[t, v] - normalizer[t] (0 when None), over the real vocabulary.

    source: [T, V] float32; normalizer: [T, 1] or None. Every log-prob that score_rows
    returns is read from here, so target, top-k, candidates and full agree bit for bit."""

    source: torch.Tensor
    normalizer: torch.Tensor | None = None

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T, n] int64 -> their log-probs [T, n] float32."""
        values = self.source.gather(1, ids)
        return values if self.normalizer is None else values.sub_(self.normalizer)

    def full(self) -> torch.Tensor:
        """Every log-prob [T, V] float32 (a new tensor only when there is a normalizer)."""
        return self.source if self.normalizer is None else self.source - self.normalizer


def log_probs(logits: torch.Tensor, temperature: float) -> LogProbs:
    """log_softmax(logits / temperature) over the last dimension, in float32.

    logits: [T, V] in the model's dtype, a view of wider rows or not. float16 and bfloat16
    widen to float32 exactly, so this is the float32 math on the model's own logits. As a
    rule it is one log_softmax over whole float32 rows (max, sum of exponentials, output in
    one kernel): per logit, a bfloat16 model moves 2 + 4 bytes into a float32 copy and 4 + 4
    through log_softmax (a float16 model's widening is fused into it on CUDA), where a
    float32 copy and logsumexp's max, subtraction, exp and sum moved 30. The exception is a
    float32 view of wider rows at temperature 1 (model(...).logits with padded rows):
    log_softmax would copy it into whole rows first (or, on the CPU, read it strided, several
    times slower), where logsumexp reads it in place and the log-probs are gathered from it.
    """
    if temperature != 1.0:
        scaled = logits.to(torch.float32, copy=True).div_(temperature)  # [T, V], whole rows
        return LogProbs(torch.log_softmax(scaled, dim=-1))
    if logits.dtype != torch.float32:
        return LogProbs(torch.log_softmax(logits, dim=-1, dtype=torch.float32))  # widened
    if logits.is_contiguous():
        return LogProbs(torch.log_softmax(logits, dim=-1))
    return LogProbs(logits, torch.logsumexp(logits, dim=-1, keepdim=True))  # [T, V], [T, 1]


def score_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    options: ScoreOptions,
    candidate_ids: torch.Tensor | None = None,
) -> SequenceScores:
    """Score T positions.

    logits: [T, V'] with V' >= vocab_size (padded embedding rows are cut here), in the
    model's dtype; targets: [T] the actual tokens; candidate_ids: [T, m] or [m] token ids.
    Every log-prob returned is one of log_softmax(logits / temperature) in float32
    (log_probs), gathered, and cast to the requested dtype last.

    Top-k and ranks only need the order of the tokens, and log p never decreases as the
    logit grows (t > 0; widening, scaling and subtracting a row's constant are monotone
    roundings), so they read the logits in the model's dtype when that is half precision
    (half the bytes, and half the radix passes of top-k, of float32) and the float32 source
    otherwise. A half-precision row has many equal logits: which of several tokens tied at
    the k-th value is returned is the top-k kernel's choice, as it was in float32 (the
    widened values tie alike); their log-probs are equal.
    """
    logits = logits[:, :vocab_size]  # [T, V], a view
    logprobs = log_probs(logits, options.temperature)
    order = logits if logits.dtype in HALF_DTYPES else logprobs.source  # [T, V]: ranks alike
    rows = targets.long().unsqueeze(1)  # [T, 1]
    target = logprobs.gather(rows).squeeze(1)  # [T]
    ranks = None
    if options.ranks:  # 1 + tokens strictly ahead; a tie is not ahead
        ranks = (order > order.gather(1, rows)).sum(-1, dtype=torch.int32).add_(1)  # [T]
    topk_ids = topk_logprobs = candidate = None
    if options.top_k > 0:
        ids = order.topk(options.top_k, dim=-1).indices  # [T, k], most likely first
        topk_logprobs = logprobs.gather(ids)  # [T, k], non-increasing
        topk_ids = ids.to(torch.int32)
    if candidate_ids is not None:
        ids = candidate_ids.long()
        if ids.dim() == 1:
            ids = ids.unsqueeze(0).expand(logits.shape[0], -1)
        candidate = logprobs.gather(ids)  # [T, m]

    def out(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(options.dtype)

    return SequenceScores(
        target_logprobs=out(target),
        topk_ids=topk_ids,
        topk_logprobs=out(topk_logprobs),
        candidate_logprobs=out(candidate),
        full_logprobs=out(logprobs.full()) if options.full else None,
        target_ranks=ranks,
    )


TENSOR_FIELDS = tuple(f.name for f in fields(SequenceScores) if f.name != "next_token_id")


def score_chunked(
    rows: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    options: ScoreOptions,
    candidate_ids: torch.Tensor | None,
    *,
    project: Callable[[torch.Tensor], torch.Tensor] | None,
    chunk_rows: int,
) -> SequenceScores:
    """score_rows over N rows, `chunk_rows` at a time, so a chunk's logits, their float32
    log-probs [chunk, V] (and a float32 copy of half-precision logits) bound memory, not
    [N, V]; the results of every chunk stay on the device until the caller copies them.

    rows: [N, H] hidden states that `project` (the output layer) turns into logits, or
    [N, V'] logits already (project None); targets: [N]; candidate_ids: [N, m] or None.
    """
    parts = [
        score_rows(
            rows[start : start + chunk_rows]
            if project is None
            else project(rows[start : start + chunk_rows]),
            targets[start : start + chunk_rows],
            vocab_size,
            options,
            None if candidate_ids is None else candidate_ids[start : start + chunk_rows],
        )
        for start in range(0, rows.shape[0], chunk_rows)
    ]
    if len(parts) == 1:
        return parts[0]
    joined = {
        name: None
        if getattr(parts[0], name) is None
        else torch.cat([getattr(part, name) for part in parts])
        for name in TENSOR_FIELDS
    }
    return SequenceScores(**joined)


def split_scores(scores: SequenceScores, sizes: list[int]) -> list[SequenceScores]:
    """Concatenated rows back into one SequenceScores per sequence of `sizes` rows (views)."""
    pieces = {
        name: [None] * len(sizes)
        if getattr(scores, name) is None
        else getattr(scores, name).split(sizes)
        for name in TENSOR_FIELDS
    }
    return [
        replace(scores, **{name: pieces[name][n] for name in TENSOR_FIELDS})
        for n in range(len(sizes))
    ]
