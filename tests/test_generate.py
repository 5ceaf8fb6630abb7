"""Generate: greedy equals an argmax loop without the KV cache; seeds reproduce samples."""

from __future__ import annotations

import torch

from causal_lm.sampling import SamplingOptions, chunk_prompts, next_token, sample


def _greedy_without_cache(backend, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            logits = backend.model(torch.tensor([ids])).logits[0, -1, : backend.vocab_size]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def test_greedy_generate_matches_a_cacheless_argmax_loop(client, backend, sequences):
    prompts = [sequences[0][:5], sequences[1][:9], sequences[2][:2]]  # mixed lengths: left padding
    results = client.generate(prompts, max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == _greedy_without_cache(backend, prompt, 12)
        assert result.finish_reason == "length"


def test_sampling_with_a_seed_is_reproducible(client, sequences):
    prompts = [sequences[0][:4], sequences[3][:6]]
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, stop_at_eos=False)
    first = client.generate(prompts, seed=7, **kwargs)
    again = client.generate(prompts, seed=7, **kwargs)
    other = client.generate(prompts, seed=8, **kwargs)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert [r.token_ids for r in first] != [r.token_ids for r in other]
    assert all(len(r.token_ids) == 16 for r in first)


def test_tiny_top_p_is_greedy():
    logits = torch.randn(64, 50)
    generator = torch.Generator().manual_seed(0)
    picked = next_token(logits, temperature=1.0, top_p=1e-6, generator=generator)
    torch.testing.assert_close(picked, logits.argmax(-1))


def test_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    temperature, draws = 0.7, 40000
    generator = torch.Generator().manual_seed(0)
    picks = next_token(logits.expand(draws, -1), temperature, 1.0, generator)
    observed = torch.bincount(picks, minlength=4).double() / draws
    expected = torch.softmax(logits[0].double() / temperature, -1)
    assert (observed - expected).abs().max() < 0.01  # ~4 standard errors at 40k draws


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(40000, -1)
    generator = torch.Generator().manual_seed(1)
    picks = next_token(logits, 1.0, 0.75, generator)  # nucleus {0, 1}: 0.5 < 0.75 <= 0.8
    observed = torch.bincount(picks, minlength=4).double() / len(picks)
    assert observed[2:].sum() == 0
    assert abs(observed[0] - 0.5 / 0.8) < 0.01


def test_generation_stops_at_eos_and_keeps_it(backend, sequences):
    prompt = sequences[1][:6]
    free = _greedy_without_cache(backend, prompt, 10)
    eos = free[4]  # pretend the 5th greedy token is the eos
    (completion,) = sample(
        backend.model,
        [prompt],
        SamplingOptions(max_new_tokens=10, temperature=0.0),
        vocab_size=backend.vocab_size,
        eos_ids=frozenset({eos}),
        pad_id=0,
        generator=None,
    )
    first = free.index(eos)
    assert completion.token_ids == free[: first + 1]
    assert completion.finish_reason == "eos"


def test_chunks_fit_the_budget_and_keep_order():
    prompts = [[1] * n for n in (3, 9, 2, 30, 4, 4, 4)]
    chunks = chunk_prompts(prompts, max_new_tokens=6, budget=40)
    assert [p for chunk in chunks for p in chunk] == prompts
    for chunk in chunks:
        assert len(chunk) == 1 or len(chunk) * (max(map(len, chunk)) + 6) <= 40


def test_greedy_completions_do_not_depend_on_their_batch_company(server, client, sequences):
    prompts = [s[:6] for s in sequences]
    results = client.generate(prompts, max_new_tokens=5, temperature=0.0, stop_at_eos=False)
    for prompt, result in zip(prompts, results):
        (alone,) = client.generate([prompt], max_new_tokens=5, temperature=0.0, stop_at_eos=False)
        assert alone.token_ids == result.token_ids
