"""The scoring math: teacher logits at the scored positions -> what docs/design.md specifies.

Pure tensor functions, so tests can hold them against the formulas. For a sequence with
score_from = s, row j is position i = s + j, predicted by the logits at position i - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """One sequence's result, on the CPU, in the requested dtype (ids in int32)."""

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
        return None if t is None else t.to(options.dtype).cpu()

    return SequenceScores(
        target_logprobs=out(target),
        topk_ids=None if topk_ids is None else topk_ids.cpu(),
        topk_logprobs=out(topk_logprobs),
        candidate_logprobs=out(candidate),
        full_logprobs=out(logits - normalizer) if options.full else None,
        target_ranks=None if ranks is None else ranks.cpu(),
    )
