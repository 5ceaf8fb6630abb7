"""Autoregressive sampling with the KV cache: greedy, temperature and nucleus (top-p).

Written out rather than delegated to `model.generate`, because generate() silently merges
in the model's own generation_config (top_k, repetition_penalty, ...): a teacher's sample
here is drawn from exactly softmax(logits / temperature) restricted to the top-p nucleus,
and nothing else. Each call owns a torch.Generator, so a seed reproduces a call exactly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from causal_lm.placement import module_device


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True


@dataclass
class Completion:
    token_ids: list[int]  # new tokens only; ends with the eos when it stopped there
    finish_reason: str  # "eos" or "length"


def cache_argument(model: torch.nn.Module) -> str:
    """The KV cache's name in forward() and its output: `cache` from transformers 5.24 on,
    `past_key_values` before (still accepted there, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_generator(options: SamplingOptions, device: torch.device) -> torch.Generator | None:
    """The request's random stream (None for greedy decoding, which needs none)."""
    if options.temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(options.seed)


def chunk_prompts(
    prompts: list[list[int]], max_new_tokens: int, budget: int
) -> list[list[list[int]]]:
    """Consecutive groups of prompts whose padded batch (rows x widest) fits `budget` tokens."""
    chunks: list[list[list[int]]] = []
    widest = 0
    for prompt in prompts:
        width = max(widest, len(prompt) + max_new_tokens)
        if chunks and width * (len(chunks[-1]) + 1) <= budget:
            chunks[-1].append(prompt)
            widest = width
        else:
            chunks.append([prompt])
            widest = len(prompt) + max_new_tokens
    return chunks


def next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick one token per row from logits [B, V]: argmax when temperature == 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    options: SamplingOptions,
    *,
    vocab_size: int,
    eos_ids: frozenset[int],
    pad_id: int,
    generator: torch.Generator | None,
) -> list[Completion]:
    """Complete each prompt (left-padded into one batch) for up to max_new_tokens tokens.

    `generator` (from `new_generator`) is the only source of randomness; pass the same one
    to consecutive chunks of a request to keep the whole request reproducible. The tokens
    are drawn on its device, the inputs go to the embedding's (they differ when a device
    map split the model: placement.py).
    """
    device = module_device(model.get_input_embeddings())
    drawn_on = device if generator is None else generator.device
    batch, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        attention_mask[row, width - len(prompt) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    stop_ids = torch.tensor(sorted(eos_ids), dtype=torch.long, device=drawn_on)
    use_stops = options.stop_at_eos and len(stop_ids) > 0

    cache = cache_argument(model)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
    )
    finished = torch.zeros(batch, dtype=torch.bool, device=drawn_on)
    new_tokens: list[torch.Tensor] = []
    for step in range(options.max_new_tokens):
        token = next_token(
            out.logits[:, -1, :vocab_size].to(drawn_on),
            options.temperature,
            options.top_p,
            generator,
        )
        token = token.masked_fill(finished, pad_id)
        new_tokens.append(token)
        if use_stops:
            finished |= torch.isin(token, stop_ids)
        if bool(finished.all()) or step == options.max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = model(
            input_ids=token.unsqueeze(1).to(device),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache: out[cache]},
        )
    generated = torch.stack(new_tokens, dim=1).tolist()
    completions = []
    for row in generated:
        stop = next((i for i, t in enumerate(row) if use_stops and t in eos_ids), None)
        if stop is None:
            completions.append(Completion(row, "length"))
        else:
            completions.append(Completion(row[: stop + 1], "eos"))
    return completions


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
