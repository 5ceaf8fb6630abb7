"""Sequences to train on: student samples (on-policy) or given outputs, as padded batches.

A sequence is prompt + completion. The loss covers exactly the completion's tokens up to
and including the first eos: prompt tokens are masked, and so is anything after the eos.
The mask comes from lengths, never from comparing ids with the pad id, so the eos is
trained even when the tokenizer's pad token *is* its eos token (a classic TRL bug).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from causal_lm.sampling import SamplingOptions, sample


def truncate_after_eos(completion: Sequence[int], eos_ids: Collection[int]) -> list[int]:
    """The completion up to and including its first eos (all of it when it has none)."""
    for index, token in enumerate(completion):
        if token in eos_ids:
            return list(completion[: index + 1])
    return list(completion)


@dataclass
class Batch:
    """Right-padded prompt + completion sequences of one micro-batch."""

    input_ids: torch.Tensor  # [B, L] int64, right-padded with pad_id
    attention_mask: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L - 1] bool: target token i + 1 is a completion token
    sequences: list[list[int]]  # unpadded prompt + completion
    prompt_lens: list[int]

    @property
    def num_tokens(self) -> int:
        """Completion tokens in the loss (eos included)."""
        return int(self.loss_mask.sum())

    @property
    def completions(self) -> list[list[int]]:
        return [seq[n:] for seq, n in zip(self.sequences, self.prompt_lens)]


def build_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    eos_ids: Collection[int],
    pad_id: int,
) -> Batch:
    """Cut each completion after its first eos, join it to its prompt, pad on the right."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    sequences, prompt_lens = [], []
    for prompt, completion in zip(prompts, completions):
        kept = truncate_after_eos(completion, eos_ids)
        if not prompt or not kept:
            raise ValueError("every sequence needs a non-empty prompt and completion")
        sequences.append([*prompt, *kept])
        prompt_lens.append(len(prompt))
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width - 1), dtype=torch.bool)
    for row, (seq, start) in enumerate(zip(sequences, prompt_lens)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
        loss_mask[row, start - 1 : len(seq) - 1] = True  # logits at i - 1 predict token i
    return Batch(input_ids, attention_mask, loss_mask, sequences, prompt_lens)


def sample_completions(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    options: SamplingOptions,
    *,
    vocab_size: int,
    eos_ids: Collection[int],
    pad_id: int,
    generator: torch.Generator | None,
) -> list[list[int]]:
    """The student's own completions (KV-cache sampling, no gradient, eval mode)."""
    was_training = model.training
    model.eval()
    try:
        completions = sample(
            model,
            [list(p) for p in prompts],
            options,
            vocab_size=vocab_size,
            eos_ids=frozenset(eos_ids),
            pad_id=pad_id,
            generator=generator,
        )
    finally:
        model.train(was_training)
    return [c.token_ids for c in completions]
