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


@dataclass(frozen=True)
class ScoreOptions:
    """What one request asks for; shared by all of its sequences."""

    top_k: int = 0
    full: bool = False
    temperature: float = 1.0
    dtype: torch.dtype = torch.float32
    ranks: bool = False  # also the actual token's 1-based rank (the vLLM dialect reports it)


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


def score_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    options: ScoreOptions,
    candidate_ids: torch.Tensor | None = None,
) -> SequenceScores:
    """Score T positions.

    logits: [T, V'] with V' >= vocab_size (padded embedding rows are cut here);
    targets: [T] the actual tokens; candidate_ids: [T, m] or [m] token ids.
    Log-probs are computed in float32 (log_softmax(logits / temperature)) and cast last.
    """
    logits = logits[:, :vocab_size].float()
    if options.temperature != 1.0:
        logits = logits / options.temperature
    # log p = logits - logsumexp(logits): the [T, V] log-probs are only built when asked for;
    # top-k of the logits is top-k of the log-probs (same row, same order)
    normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
    target_logits = logits.gather(1, targets.long().unsqueeze(1))
    ranks = (logits > target_logits).sum(-1).add_(1).to(torch.int32) if options.ranks else None
    target = target_logits.sub(normalizer).squeeze(1)
    topk_ids = topk_logprobs = candidate = None
    if options.top_k > 0:
        topk_logprobs, topk_ids = logits.topk(options.top_k, dim=-1)
        topk_logprobs = topk_logprobs.sub_(normalizer)
        topk_ids = topk_ids.to(torch.int32)
    if candidate_ids is not None:
        ids = candidate_ids.long()
        if ids.dim() == 1:
            ids = ids.unsqueeze(0).expand(logits.shape[0], -1)
        candidate = logits.gather(1, ids).sub_(normalizer)

    def out(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(options.dtype)

    return SequenceScores(
        target_logprobs=out(target),
        topk_ids=topk_ids,
        topk_logprobs=out(topk_logprobs),
        candidate_logprobs=out(candidate),
        full_logprobs=out(logits - normalizer) if options.full else None,
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
    """score_rows over N rows, `chunk_rows` at a time, so the float32 [chunk, V] logits
    (and the few temporaries the math makes of them) bound memory, not [N, V].

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
