"""The vLLM/OpenAI completions dialect, held against gRPC Score/Generate and a local forward."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
import torch

from teacher_service.config import Limits
from tests.conftest import reference_logprobs, start_background_server


def post(http_url: str, **body) -> dict:
    answer = httpx.post(f"{http_url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def reference_rank_bounds(backend, ids: list[int], position: int, rows=None) -> tuple[int, int]:
    """1-based rank of ids[position] from an independent forward, as (low, high) bounds that
    allow for float32-vs-float64 near-ties."""
    rows = reference_logprobs(backend, ids) if rows is None else rows
    row = rows[position - 1].double()
    target = row[ids[position]]
    return int((row > target + 1e-5).sum()) + 1, int((row > target - 1e-5).sum()) + 1


# --- TRL's client, mirrored: trl/generation/vllm_client.py (huggingface/trl, VLLMClient) ----


def trl_get_sequence_logprobs(
    base_url: str, sequences, prompt_lengths, top_logprobs: int, temperature: float
) -> dict[str, list]:
    """VLLMClient.get_sequence_logprobs (one chunk) + _format_sequence_logprobs, as in TRL."""
    model = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
    payload = {
        "model": model,
        "prompt": sequences,
        "max_tokens": 1,
        "temperature": temperature,
        "prompt_logprobs": top_logprobs,
    }
    answer = httpx.post(f"{base_url}/v1/completions", json=payload, timeout=60)
    assert answer.status_code == 200, answer.text
    results = []
    for choice, sequence, prompt_length in zip(
        answer.json()["choices"], sequences, prompt_lengths, strict=True
    ):
        logprobs, logprob_token_ids, actual_logprobs, actual_token_ids = [], [], [], []
        for position in range(prompt_length, len(choice["prompt_logprobs"])):
            position_logprobs = choice["prompt_logprobs"][position] or {}
            items = sorted(position_logprobs.items(), key=lambda item: item[1]["rank"])
            items = items[:top_logprobs]
            values = [-math.inf if math.isnan(i["logprob"]) else i["logprob"] for _, i in items]
            token_ids = [int(token_id) for token_id, _ in items]
            logprobs.append(values + [-math.inf] * (top_logprobs - len(values)))
            logprob_token_ids.append(token_ids + [0] * (top_logprobs - len(token_ids)))
            actual = position_logprobs.get(str(sequence[position]))
            actual_logprobs.append(
                [
                    -math.inf
                    if actual is None or math.isnan(actual["logprob"])
                    else actual["logprob"]
                ]
            )
            actual_token_ids.append([sequence[position]])
        results.append(
            {
                "logprobs": logprobs,
                "logprob_token_ids": logprob_token_ids,
                "actual_logprobs": actual_logprobs,
                "actual_token_ids": actual_token_ids,
            }
        )
    return {key: [result[key] for result in results] for key in results[0]}


def trl_generate(base_url: str, prompts, *, max_tokens: int, temperature: float, logprobs: int):
    """VLLMClient.generate's payload and its parse_logprobs (completions branch), as in TRL."""
    payload = {
        "model": httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"],
        "prompt": prompts,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "n": 1,
        "repetition_penalty": 1.0,
        "temperature": temperature,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "max_tokens": max_tokens,
        "logprobs": logprobs,
    }
    answer = httpx.post(f"{base_url}/v1/completions", json=payload, timeout=60)
    assert answer.status_code == 200, answer.text
    choices = answer.json()["choices"]
    all_logprobs, all_ids = [], []
    for lp in (choice["logprobs"] for choice in choices):
        seq_logprobs, seq_ids = [], []
        for token, logprob, top in zip(
            lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
        ):
            items = sorted({token: logprob, **(top or {})}.items(), key=lambda item: -item[1])
            seq_ids.append([int(t.removeprefix("token_id:")) for t, _ in items])
            seq_logprobs.append([value for _, value in items])
        all_logprobs.append(seq_logprobs)
        all_ids.append(seq_ids)
    return {
        "prompt_ids": [choice["prompt_token_ids"] for choice in choices],
        "completion_ids": [choice["token_ids"] for choice in choices],
        "logprobs": all_logprobs,
        "logprob_token_ids": all_ids,
    }


# --- prompt_logprobs ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_prompt_logprobs_equal_grpc_score(
    http_url, client, backend, tokenizer, sequences, temperature
):
    k = 4
    got = post(http_url, prompt=sequences, max_tokens=0, prompt_logprobs=k, temperature=temperature)
    expected = client.score(sequences, 1, top_k=k, temperature=temperature)
    assert got["object"] == "text_completion" and len(got["choices"]) == len(sequences)
    outside = 0
    for choice, ids, want in zip(got["choices"], sequences, expected, strict=True):
        positions, rows = choice["prompt_logprobs"], reference_logprobs(backend, ids)
        assert len(positions) == len(ids) and positions[0] is None
        assert choice["text"] == "" and choice["logprobs"] is None
        for p in range(1, len(ids)):
            entries = positions[p]
            actual = entries[str(ids[p])]
            assert next(iter(entries)) == str(ids[p])  # vLLM's order: the actual token first
            assert actual["logprob"] == pytest.approx(float(want.target_logprobs[p - 1]), abs=1e-5)
            low, high = reference_rank_bounds(backend, ids, p, rows)
            assert low <= actual["rank"] <= high
            top = sorted((e["rank"], int(t), e["logprob"]) for t, e in entries.items())
            top = [entry for entry in top if entry[0] <= k]
            assert [rank for rank, _, _ in top] == list(range(1, k + 1))
            np.testing.assert_array_equal([t for _, t, _ in top], want.topk_ids[p - 1])
            np.testing.assert_allclose([v for _, _, v in top], want.topk_logprobs[p - 1], atol=1e-5)
            assert len(entries) == (k if actual["rank"] <= k else k + 1)
            outside += actual["rank"] > k
            for token, entry in entries.items():
                assert entry["decoded_token"] == tokenizer.decode([int(token)])
    assert outside > 0  # the actual token outside the top-k was exercised


def test_prompt_logprobs_match_local_forward_and_one_token_prompt(http_url, backend, sequences):
    ids = sequences[1]
    got = post(http_url, prompt=[ids, [ids[0]]], max_tokens=0, prompt_logprobs=0)
    reference = reference_logprobs(backend, ids, 1.0)
    positions = got["choices"][0]["prompt_logprobs"]
    for p in range(1, len(ids)):
        assert list(positions[p]) == [str(ids[p])]  # k = 0: the actual token alone
        want = float(reference[p - 1, ids[p]])
        assert positions[p][str(ids[p])]["logprob"] == pytest.approx(want, abs=1e-5)
    assert got["choices"][1]["prompt_logprobs"] == [None]
    assert got["usage"] == {
        "prompt_tokens": len(ids) + 1,
        "completion_tokens": 0,
        "total_tokens": len(ids) + 1,
    }


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_get_sequence_logprobs_recovers_teacher_topk(
    http_url, client, backend, sequences, temperature
):
    k = 3
    prompt_lengths = [max(1, len(s) // 2) for s in sequences]
    got = trl_get_sequence_logprobs(http_url, sequences, prompt_lengths, k, temperature)
    expected = client.score(sequences, prompt_lengths, top_k=k, temperature=temperature)
    for n, (ids, start, want) in enumerate(zip(sequences, prompt_lengths, expected)):
        np.testing.assert_array_equal(got["logprob_token_ids"][n], want.topk_ids)
        np.testing.assert_allclose(got["logprobs"][n], want.topk_logprobs, atol=1e-5)
        actual = np.asarray(got["actual_logprobs"][n])[:, 0]
        np.testing.assert_allclose(actual, want.target_logprobs, atol=1e-5)
        assert got["actual_token_ids"][n] == [[t] for t in ids[start:]]
        reference = reference_logprobs(backend, ids, temperature)[start - 1 : len(ids) - 1]
        np.testing.assert_allclose(
            actual, reference[np.arange(len(actual)), ids[start:]], atol=1e-5
        )


# --- logprobs (OpenAI's legacy format) ------------------------------------------------------


def test_echo_logprobs_without_generation_equal_grpc(http_url, client, tokenizer, sequences):
    ids, n = sequences[3], 2
    got = post(http_url, prompt=ids, max_tokens=0, echo=True, logprobs=n)
    (want,) = client.score([ids], 1, top_k=n)
    choice = got["choices"][0]
    lp = choice["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:], want.target_logprobs, atol=1e-5)
    for p in range(1, len(ids)):
        top = lp["top_logprobs"][p]
        expected = {tokenizer.decode([int(t)]) for t in want.topk_ids[p - 1]}
        assert expected | {lp["tokens"][p]} == set(top)
        for t, v in zip(want.topk_ids[p - 1], want.topk_logprobs[p - 1]):
            assert top[tokenizer.decode([int(t)])] == pytest.approx(float(v), abs=1e-5)
    offsets = np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]).tolist()
    assert lp["text_offset"] == offsets
    assert choice["text"] == tokenizer.decode(ids)
    assert len(choice["prompt_logprobs"]) == len(ids)  # echo: vLLM returns them at `logprobs`
    assert got["usage"]["completion_tokens"] == 0


def test_generated_token_logprobs_equal_grpc_score(http_url, client, sequences):
    prompts = sequences[:3]
    got = post(
        http_url,
        prompt=prompts,
        max_tokens=6,
        temperature=0,
        logprobs=1,
        echo=True,
        return_token_ids=True,
    )
    generated = client.generate(prompts, max_new_tokens=6, temperature=0)
    full = [p + g.token_ids for p, g in zip(prompts, generated)]
    expected = client.score(full, 1, top_k=1, temperature=1.0)  # greedy scores at T = 1
    for choice, prompt, g, want in zip(got["choices"], prompts, generated, expected):
        assert choice["token_ids"] == g.token_ids and choice["prompt_token_ids"] == prompt
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + len(g.token_ids)
        np.testing.assert_allclose(lp["token_logprobs"][1:], want.target_logprobs, atol=1e-5)


def test_trl_generate_parses_token_ids_and_logprobs(http_url, client, sequences):
    prompts = sequences[:2]
    got = trl_generate(http_url, prompts, max_tokens=5, temperature=0.0, logprobs=2)
    generated = client.generate(prompts, max_new_tokens=5, temperature=0)
    assert got["prompt_ids"] == prompts
    assert got["completion_ids"] == [g.token_ids for g in generated]
    for n, (prompt, g) in enumerate(zip(prompts, generated)):
        (want,) = client.score([prompt + g.token_ids], len(prompt), top_k=2)
        for c, token in enumerate(g.token_ids):
            values = dict(zip(got["logprob_token_ids"][n][c], got["logprobs"][n][c]))
            assert values[token] == pytest.approx(float(want.target_logprobs[c]), abs=1e-5)
            for t, v in zip(want.topk_ids[c], want.topk_logprobs[c]):
                assert values[int(t)] == pytest.approx(float(v), abs=1e-5)


# --- prompts, generation, stop strings, models ----------------------------------------------


def test_string_prompts_tokenize_and_generate_like_grpc(http_url, client, tokenizer):
    texts = ["Ada has 12 apples.", "Gus counts 2 shells"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    generated = client.generate(ids, max_new_tokens=7, temperature=0)
    single = post(http_url, prompt=texts[0], max_tokens=7, temperature=0, return_token_ids=True)
    several = post(http_url, prompt=texts, max_tokens=7, temperature=0, return_token_ids=True)
    assert single["choices"][0]["prompt_token_ids"] == ids[0]
    assert single["choices"][0]["token_ids"] == generated[0].token_ids
    for choice, prompt, g in zip(several["choices"], ids, generated, strict=True):
        assert choice["prompt_token_ids"] == prompt and choice["token_ids"] == g.token_ids
        assert choice["text"] == tokenizer.decode(g.token_ids, skip_special_tokens=True)
        assert choice["finish_reason"] == {"eos": "stop", "length": "length"}[g.finish_reason]
    completion = sum(len(g.token_ids) for g in generated)
    prompt = sum(len(p) for p in ids)
    assert several["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    assert several["model"] == httpx.get(f"{http_url}/v1/models").json()["data"][0]["id"]


def test_stop_string_cuts_the_completion(http_url, client, tokenizer, sequences):
    prompt = sequences[0]
    (g,) = client.generate([prompt], max_new_tokens=12, temperature=0, stop_at_eos=False)
    text = tokenizer.decode(g.token_ids, skip_special_tokens=True)
    stop = tokenizer.decode(g.token_ids[4:6], skip_special_tokens=True)
    assert stop and stop in text
    got = post(
        http_url,
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        ignore_eos=True,
        stop=[stop],
        return_token_ids=True,
    )["choices"][0]
    assert got["text"] == text[: text.find(stop)]
    assert got["finish_reason"] == "stop" and got["stop_reason"] == stop
    kept = got["token_ids"]
    assert kept == g.token_ids[: len(kept)]
    assert stop in tokenizer.decode(kept, skip_special_tokens=True)
    assert stop not in tokenizer.decode(kept[:-1], skip_special_tokens=True)


def test_seed_repeats_like_grpc_and_no_seed_draws_anew(http_url, client, sequences):
    prompt = sequences[2]
    (g,) = client.generate([prompt], max_new_tokens=10, temperature=1.0, seed=123)
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 1.0, "return_token_ids": True}
    seeded = post(http_url, **body, seed=123)["choices"][0]
    assert seeded["token_ids"] == g.token_ids
    unseeded = {tuple(post(http_url, **body)["choices"][0]["token_ids"]) for _ in range(4)}
    assert len(unseeded) > 1  # vLLM's behaviour: a request without seed samples anew


def test_echo_of_a_string_prompt_keeps_its_text(http_url, client, tokenizer):
    text = "Dara sells 7 marbles."
    (g,) = client.generate([tokenizer(text)["input_ids"]], max_new_tokens=4, temperature=0)
    got = post(http_url, prompt=text, max_tokens=4, temperature=0, echo=True)["choices"][0]
    assert got["text"] == text + tokenizer.decode(g.token_ids, skip_special_tokens=True)


def test_models_lists_the_served_model(http_url, client):
    got = httpx.get(f"{http_url}/v1/models").json()
    info = client.info()
    assert got["object"] == "list"
    (card,) = got["data"]
    assert card["id"] == info.model_id and card["object"] == "model"
    assert card["max_model_len"] == info.max_seq_len


# --- bad input: a 4xx naming the field, never a 500 -----------------------------------------

BAD = [
    ({"prompt": [1, 5], "temprature": 1.0}, 422, "temprature"),
    ({"prompt": [1, 5], "max_tokens": "5"}, 422, "max_tokens"),
    ({"prompt": [1, 5], "echo": "yes"}, 422, "echo"),
    ({"prompt": [1, 5], "n": 0}, 422, "n"),
    ({"prompt": [1, 5], "stream": True}, 422, "stream"),
    ({"prompt": [1, 5, 512]}, 422, "prompt[2]"),
    ({"prompt": [[1, 5], [1, 10**30]]}, 422, "prompt[1][1]"),
    ({"prompt": [[1, 5], [1, -3]]}, 422, "prompt"),
    ({"prompt": [[1, 5], []]}, 422, "prompt[1]"),
    ({"prompt": [[1, 5], [1, 512]]}, 422, "prompt[1][1]"),
    ({"prompt": []}, 422, "prompt"),
    ({"max_tokens": 1}, 422, "prompt"),
    ({"prompt": [1, 5], "max_tokens": -1}, 422, "max_tokens"),
    ({"prompt": [1, 5], "max_tokens": 10**12}, 422, "max_tokens"),
    ({"prompt": [1, 5], "temperature": -0.5}, 422, "temperature"),
    ({"prompt": [1, 5], "top_p": 1.5}, 422, "top_p"),
    ({"prompt": [1, 5], "logprobs": 10**6}, 422, "logprobs"),
    ({"prompt": [1, 5], "prompt_logprobs": -2}, 422, "prompt_logprobs"),
    ({"prompt": [1, 5], "frequency_penalty": 0.5}, 422, "frequency_penalty"),
    ({"prompt": [1, 5], "best_of": 3}, 422, "best_of"),
    ({"prompt": [1, 5], "seed": 2**70}, 422, "seed"),
    ([1, 2, 3], 422, None),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_input_names_the_field(http_url, body, status, param):
    answer = httpx.post(f"{http_url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["code"] == status
    assert error["type"] == "invalid_request_error"
    assert (param or "body") in error["message"]


def test_too_many_tokens_is_413_naming_the_prompt(http_url, client):
    limit = client.info().max_tokens_per_request
    prompts = [[1] + [7] * 400] * (limit // 401 + 1)
    body = {"prompt": prompts, "max_tokens": 1, "prompt_logprobs": 1}
    answer = httpx.post(f"{http_url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    assert error["param"] == "prompt" and "max_tokens_per_request" in error["message"]


def test_an_engine_refusal_names_the_prompt_as_the_body_does(tiny_model_dir, backend):
    """The engine is told that sequence 1 is `prompt[1]`: its error says so, no rewriting."""
    limits = Limits(max_batch_tokens=64)
    running = start_background_server(tiny_model_dir, backend, limits=limits, http_port=0)
    try:
        body = {"prompt": [[1, 5], [1] + [7] * 80], "max_tokens": 0, "prompt_logprobs": 1}
        answer = httpx.post(f"{running.http_url}/v1/completions", json=body, timeout=60)
    finally:
        running.stop()
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    assert error["param"] == "prompt[1]"
    assert error["message"].startswith("prompt[1]: 81 tokens")
    assert "max_batch_tokens" in error["message"]
    assert "sequences" not in error["message"]


def test_malformed_json_is_400(http_url):
    answer = httpx.post(
        f"{http_url}/v1/completions",
        content=b'{"prompt": [1, 2',
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 400
    assert "JSON" in answer.json()["error"]["message"]
    # and the service keeps answering
    assert post(http_url, prompt=[1, 5], max_tokens=1)["usage"]["completion_tokens"] == 1


def test_one_token_beside_prompt_logprobs_comes_from_the_scoring_forward(
    http_url, client, backend, sequences
):
    """TRL's request (max_tokens = 1 + prompt_logprobs) is served by one forward pass: the
    token is drawn from the last position's distribution, greedy or seeded."""
    prompts = [s[:6] for s in sequences[:4]]
    greedy = httpx.post(
        f"{http_url}/v1/completions",
        json={
            "prompt": prompts,
            "max_tokens": 1,
            "prompt_logprobs": 3,
            "temperature": 0.0,
            "return_token_ids": True,
        },
    ).json()
    expected = client.generate(prompts, max_new_tokens=1, temperature=0.0)
    assert [c["token_ids"] for c in greedy["choices"]] == [e.token_ids for e in expected]
    seeded = httpx.post(
        f"{http_url}/v1/completions",
        json={
            "prompt": prompts,
            "max_tokens": 1,
            "prompt_logprobs": 3,
            "temperature": 0.7,
            "seed": 11,
            "return_token_ids": True,
        },
    ).json()
    for n, (prompt, choice) in enumerate(zip(prompts, seeded["choices"])):
        # independent: the next-token distribution from an unbatched in-process forward
        with torch.inference_mode():
            logits = backend.model(torch.tensor([prompt])).logits[0, -1, : backend.vocab_size]
        probs = torch.softmax(logits.float() / 0.7, dim=-1).unsqueeze(0)
        draw = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(11 + n))
        assert choice["token_ids"] == [int(draw)]
        positions = choice["prompt_logprobs"]
        (want,) = client.score([prompt], 1, top_k=3, temperature=0.7)
        got = [positions[i + 1][str(prompt[i + 1])]["logprob"] for i in range(len(prompt) - 1)]
        np.testing.assert_allclose(got, want.target_logprobs, atol=1e-5)


# --- model and n, with the official openai SDK ----------------------------------------------


@pytest.fixture(scope="module")
def sdk(http_url):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{http_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_an_unknown_model_is_openais_not_found_naming_the_param(sdk, http_url, client):
    import openai

    with pytest.raises(openai.NotFoundError) as raised:
        sdk.completions.create(model="no-such-model", prompt=[1, 5, 9], max_tokens=1)
    assert raised.value.status_code == 404
    answer = httpx.post(
        f"{http_url}/v1/completions", json={"model": "no-such-model", "prompt": [1, 5]}
    )
    assert answer.status_code == 404
    assert answer.json() == {
        "error": {
            "message": "The model `no-such-model` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    served = sdk.models.list().data[0].id
    assert served == client.info().model_id
    got = sdk.completions.create(model=served, prompt=[1, 5, 9], max_tokens=1)
    assert len(got.choices) == 1


def test_n_choices_are_reproducible_with_a_seed_and_choice_j_is_n1_with_seed_plus_j(
    sdk, http_url, client, sequences
):
    model = client.info().model_id
    prompts = [sequences[0][:5], sequences[2][:4]]
    fields = {"model": model, "prompt": prompts, "max_tokens": 6, "temperature": 1.0}
    extra = {"return_token_ids": True, "prompt_logprobs": 2}
    first = sdk.completions.create(**fields, n=3, seed=41, logprobs=2, extra_body=extra)
    again = sdk.completions.create(**fields, n=3, seed=41, logprobs=2, extra_body=extra)
    assert [c.index for c in first.choices] == list(range(6))  # prompt i's choice j: i * 3 + j
    tokens = [c.model_extra["token_ids"] for c in first.choices]
    assert [c.model_extra["token_ids"] for c in again.choices] == tokens
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    for mine, theirs in zip(first.choices, again.choices):  # batched apart: rounding only
        np.testing.assert_allclose(
            mine.logprobs.token_logprobs, theirs.logprobs.token_logprobs, atol=1e-5
        )
    assert len({tuple(t) for t in tokens[:3]}) > 1  # three draws, not one thrice
    for j in range(3):
        alone = post(http_url, **fields, **extra, n=1, seed=41 + j, logprobs=2)
        for i, want in enumerate(alone["choices"]):
            got = first.choices[i * 3 + j]
            assert got.model_extra["token_ids"] == want["token_ids"]
            assert got.text == want["text"] and got.finish_reason == want["finish_reason"]
            np.testing.assert_allclose(
                got.logprobs.token_logprobs, want["logprobs"]["token_logprobs"], atol=1e-5
            )
            assert got.logprobs.tokens == want["logprobs"]["tokens"]
            assert len(got.model_extra["prompt_logprobs"]) == len(prompts[i])
    assert first.usage.prompt_tokens == sum(len(p) for p in prompts)  # each prompt once
    assert first.usage.completion_tokens == sum(len(t) for t in tokens)
    # choice 0 is the n = 1 answer to the same seed
    assert (
        first.choices[0].model_extra["token_ids"]
        == post(http_url, **fields, seed=41, return_token_ids=True)["choices"][0]["token_ids"]
    )


def test_n_choices_of_one_scoring_forward_each_equal_n1_with_the_derived_seed(
    http_url, client, sequences
):
    """TRL's shape (max_tokens = 1 beside prompt_logprobs) with n = 3: each choice is the
    fused n = 1 request with seed s + j, prompt log-probs included."""
    prompts = [s[:6] for s in sequences[:2]]
    body = {"prompt": prompts, "max_tokens": 1, "prompt_logprobs": 2, "temperature": 0.9}
    body["return_token_ids"] = True
    got = post(http_url, **body, n=3, seed=7)["choices"]
    assert len(got) == 6
    for j in range(3):
        alone = post(http_url, **body, seed=7 + j)["choices"]
        for i, want in enumerate(alone):
            choice = got[i * 3 + j]
            assert choice["index"] == i * 3 + j
            assert choice["token_ids"] == want["token_ids"]
            for mine, theirs in zip(choice["prompt_logprobs"][1:], want["prompt_logprobs"][1:]):
                assert mine.keys() == theirs.keys()
                for token, entry in mine.items():
                    assert entry["logprob"] == pytest.approx(theirs[token]["logprob"], abs=1e-5)


def test_n_times_prompts_over_the_sequence_limit_is_413_naming_n(http_url, client):
    limit = client.info().max_sequences_per_request
    answer = httpx.post(
        f"{http_url}/v1/completions", json={"prompt": [[1, 5]] * 2, "n": limit, "max_tokens": 1}
    )
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    assert error["param"] == "n" and "max_sequences_per_request" in error["message"]


def test_an_unknown_route_under_v1_is_openais_not_found_naming_what_is_served(sdk, http_url):
    import openai

    with pytest.raises(openai.NotFoundError) as raised:
        sdk.embeddings.create(model="any", input="Ada has 12 apples.")
    error = raised.value
    assert error.status_code == 404 and error.type == "invalid_request_error"
    assert error.param is None and error.code == "404"
    message = error.body["message"]
    assert message.startswith("Invalid URL (POST /v1/embeddings): not served here")
    for route in ("POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models"):
        assert route in message
    answer = httpx.get(f"{http_url}/v1/no/such/route")
    assert answer.status_code == 404
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert "(GET /v1/no/such/route)" in answer.json()["error"]["message"]
    # a served route with another method stays 405; outside /v1/, FastAPI's own answer
    assert httpx.get(f"{http_url}/v1/completions").status_code == 405
    outside = httpx.post(f"{http_url}/no-such-route")
    assert outside.status_code == 404 and outside.json() == {"detail": "Not Found"}
    # an unknown model is a distinct 404: vLLM's NotFoundError naming `model`
    wrong_model = httpx.post(f"{http_url}/v1/completions", json={"model": "x", "prompt": [1]})
    assert wrong_model.json()["error"]["type"] == "NotFoundError"
