"""The TGI dialect (POST / and /generate, GET /info), held against independent numbers:
the gRPC client's Score / Generate on the same server, an in-process forward
(reference_logprobs), and Hugging Face's own `text-generation` client, run from its own
venv (`make tgi-client-venv`; it pins huggingface_hub<1.0, which .venv cannot take)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import TEXTS, reference_logprobs

ROOT = Path(__file__).resolve().parents[1]
CLIENT_PYTHON = ROOT / ".cache" / "tgi-client-venv" / "bin" / "python"
ATOL = 1e-5

CLIENT_SCRIPT = """
import json, sys
from text_generation import Client
from text_generation.errors import ValidationError

url, text = sys.argv[1], sys.argv[2]
client = Client(url, timeout=60)
greedy = client.generate(text, max_new_tokens=8, decoder_input_details=True, top_n_tokens=3)
sampled = client.generate(text, max_new_tokens=6, do_sample=True, temperature=0.8, seed=5)
try:
    client.generate(text, watermark=True)
    refused = None
except ValidationError as error:
    refused = str(error)
print(json.dumps({
    "greedy": greedy.model_dump(mode="json"),
    "sampled": sampled.model_dump(mode="json"),
    "refused": refused,
}))
"""


def post(http_url: str, path: str, inputs: str, **parameters) -> httpx.Response:
    # generation to the model's limit: seconds on loaded cores, past httpx's default 5 s
    body = {"inputs": inputs, "parameters": parameters}
    return httpx.post(f"{http_url}{path}", json=body, timeout=60)


def generate(http_url: str, inputs: str, **parameters) -> dict:
    response = post(http_url, "/generate", inputs, **parameters)
    assert response.status_code == 200, response.text
    return response.json()


def ids_of(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def test_text_generation_client_works_unchanged(http_url, client, tokenizer) -> None:
    if not CLIENT_PYTHON.exists():
        pytest.fail(
            f"{CLIENT_PYTHON} is missing: run `make test` (or `make tgi-client-venv`) to "
            "build the isolated venv with Hugging Face's text-generation client"
        )
    text = TEXTS[0]
    run = subprocess.run(
        [str(CLIENT_PYTHON), "-c", CLIENT_SCRIPT, http_url, text],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    ids = ids_of(tokenizer, text)

    details = out["greedy"]["details"]
    assert [t["id"] for t in details["prefill"]] == ids
    assert details["prefill"][0]["logprob"] is None
    (prompt_scores,) = client.score([ids], score_from=1, top_k=0)
    prefill = [t["logprob"] for t in details["prefill"][1:]]
    np.testing.assert_allclose(prefill, prompt_scores.target_logprobs, atol=ATOL)

    (expected,) = client.generate([ids], max_new_tokens=8, temperature=0.0)
    new = [t["id"] for t in details["tokens"]]
    assert new == expected.token_ids[: len(new)]
    assert details["generated_tokens"] == len(new) and details["seed"] is None
    assert (
        details["finish_reason"] == {"eos": "eos_token", "length": "length"}[expected.finish_reason]
    )
    (scores,) = client.score([ids + new], score_from=len(ids), top_k=3)
    np.testing.assert_allclose(
        [t["logprob"] for t in details["tokens"]], scores.target_logprobs, atol=ATOL
    )
    tops = details["top_tokens"]
    assert [[t["id"] for t in row] for row in tops] == scores.topk_ids.tolist()
    np.testing.assert_allclose(
        [[t["logprob"] for t in row] for row in tops], scores.topk_logprobs, atol=ATOL
    )
    assert out["greedy"]["generated_text"] == tokenizer.decode(new, skip_special_tokens=True)

    sampled = out["sampled"]["details"]
    (expected,) = client.generate([ids], max_new_tokens=6, temperature=0.8, seed=5)
    assert [t["id"] for t in sampled["tokens"]] == expected.token_ids
    assert sampled["seed"] == 5
    assert "watermark" in out["refused"]


def test_huggingface_hub_inference_client(http_url, client, tokenizer) -> None:
    """huggingface_hub (in .venv with transformers) speaks the same dialect to `/`."""
    from huggingface_hub import InferenceClient

    text = TEXTS[1]
    ids = ids_of(tokenizer, text)
    out = InferenceClient(model=http_url, timeout=60).text_generation(
        text, max_new_tokens=5, details=True, decoder_input_details=True, top_n_tokens=2
    )
    (prompt_scores,) = client.score([ids], score_from=1, top_k=0)
    assert [t.id for t in out.details.prefill] == ids
    prefill = [t.logprob for t in out.details.prefill[1:]]
    np.testing.assert_allclose(prefill, prompt_scores.target_logprobs, atol=ATOL)
    (expected,) = client.generate([ids], max_new_tokens=5, temperature=0.0)
    assert [t.id for t in out.details.tokens] == expected.token_ids
    assert len(out.details.top_tokens) == 5


def test_prefill_is_the_teachers_score_at_temperature_1(http_url, client, backend, tokenizer):
    for text in TEXTS[:3]:
        ids = ids_of(tokenizer, text)
        # sampling at 0.5 must not change the prefill: TGI's are of the raw logits
        answer = generate(
            http_url,
            text,
            max_new_tokens=1,
            decoder_input_details=True,
            do_sample=True,
            temperature=0.5,
            seed=1,
        )
        prefill = answer["details"]["prefill"]
        assert [t["id"] for t in prefill] == ids
        assert [t["text"] for t in prefill] == [tokenizer.decode([i]) for i in ids]
        assert prefill[0]["logprob"] is None
        got = np.array([t["logprob"] for t in prefill[1:]])
        (scores,) = client.score([ids], score_from=1, top_k=0)
        np.testing.assert_allclose(got, scores.target_logprobs, atol=ATOL)
        reference = reference_logprobs(backend, ids)
        np.testing.assert_allclose(
            got, reference[np.arange(len(ids) - 1), ids[1:]].numpy(), atol=ATOL
        )


def test_sampled_tokens_and_top_tokens_are_at_the_sampling_temperature(
    http_url, client, backend, tokenizer
) -> None:
    text, t = TEXTS[2], 0.7
    ids = ids_of(tokenizer, text)
    answer = generate(
        http_url,
        text,
        max_new_tokens=6,
        do_sample=True,
        temperature=t,
        seed=3,
        top_n_tokens=4,
        details=True,
    )
    details = answer["details"]
    assert "prefill" in details and details["prefill"] == []  # no decoder_input_details
    (expected,) = client.generate([ids], max_new_tokens=6, temperature=t, seed=3)
    new = [token["id"] for token in details["tokens"]]
    assert new == expected.token_ids and details["seed"] == 3
    (scores,) = client.score([ids + new], score_from=len(ids), top_k=4, temperature=t)
    logprobs = [token["logprob"] for token in details["tokens"]]
    np.testing.assert_allclose(logprobs, scores.target_logprobs, atol=ATOL)
    reference = reference_logprobs(backend, ids + new, t)[len(ids) - 1 : -1]
    np.testing.assert_allclose(logprobs, reference[np.arange(len(new)), new], atol=ATOL)
    top = details["top_tokens"]
    assert [[x["id"] for x in row] for row in top] == scores.topk_ids.tolist()
    top_logprobs = [[x["logprob"] for x in row] for row in top]
    np.testing.assert_allclose(top_logprobs, reference.topk(4).values, atol=ATOL)


def test_root_answers_a_list_and_generate_an_object(http_url, tokenizer) -> None:
    body = {"inputs": TEXTS[1], "parameters": {"max_new_tokens": 4}}
    root = httpx.post(f"{http_url}/", json={**body, "stream": False})
    plain = httpx.post(f"{http_url}/generate", json=body, timeout=60)
    assert root.status_code == plain.status_code == 200
    assert isinstance(root.json(), list) and root.json() == [plain.json()]
    assert set(plain.json()) == {"generated_text"}  # no details unless asked
    assert plain.headers["x-generated-tokens"] == "4"
    assert plain.headers["x-prompt-tokens"] == str(len(ids_of(tokenizer, TEXTS[1])))


def test_finish_reasons_length_and_eos(http_url, client, tokenizer) -> None:
    answer = generate(http_url, TEXTS[3], max_new_tokens=3, details=True)
    assert answer["details"]["finish_reason"] == "length"
    assert answer["details"]["generated_tokens"] == 3

    # a one-word prompt whose greedy completion ends with eos (found through gRPC)
    prompts = [[ids_of(tokenizer, "")[0], t] for t in range(3, len(tokenizer))]
    completions = client.generate(prompts, max_new_tokens=40, temperature=0.0)
    words = [
        tokenizer.decode(prompt[1:])
        for prompt, c in zip(prompts, completions)
        if c.finish_reason == "eos" and ids_of(tokenizer, tokenizer.decode(prompt[1:])) == prompt
    ]
    assert words, "no prompt of the tiny model ends with eos under greedy decoding"
    ids = ids_of(tokenizer, words[0])
    (expected,) = client.generate([ids], max_new_tokens=40, temperature=0.0)
    details = generate(http_url, words[0], max_new_tokens=40, details=True)["details"]
    assert details["finish_reason"] == "eos_token"
    assert [t["id"] for t in details["tokens"]] == expected.token_ids
    assert details["tokens"][-1]["id"] == tokenizer.eos_token_id
    assert details["tokens"][-1]["special"] is True
    answer = generate(http_url, words[0], max_new_tokens=40)
    assert tokenizer.eos_token not in answer["generated_text"]


def test_stop_sequences_end_the_completion(http_url, client, tokenizer) -> None:
    text = TEXTS[0]
    ids = ids_of(tokenizer, text)
    (full,) = client.generate([ids], max_new_tokens=24, temperature=0.0)
    prefixes = [tokenizer.decode(full.token_ids[:j]) for j in range(len(full.token_ids) + 1)]

    def first_new_stop(start: int) -> tuple[int, str]:
        """The first j >= start whose text ends with a printable pair not seen before."""
        for j in range(start, len(prefixes)):
            pair = prefixes[j][-2:]
            usable = len(pair) == 2 and pair.isascii() and pair.isprintable()
            if usable and pair not in prefixes[j - 1]:
                return j, pair
        raise AssertionError(f"no usable stop string in {prefixes[-1]!r}")

    early, early_stop = first_new_stop(3)
    late, late_stop = first_new_stop(early + 2)
    for stops, cut in (([late_stop], late), ([late_stop, early_stop], early)):
        details = generate(http_url, text, max_new_tokens=24, stop=stops, details=True)
        assert details["details"]["finish_reason"] == "stop_sequence", stops
        assert [t["id"] for t in details["details"]["tokens"]] == full.token_ids[:cut]
        assert details["generated_text"] == prefixes[cut]


def test_defaults_truncate_full_text_and_seed(http_url, client, backend, tokenizer) -> None:
    text = TEXTS[4]
    ids = ids_of(tokenizer, text)
    long = generate(http_url, text, max_new_tokens=None, details=True)["details"]
    assert long["generated_tokens"] <= backend.max_seq_len - len(ids)
    if long["finish_reason"] == "length":  # null: up to max_total_tokens
        assert long["generated_tokens"] == backend.max_seq_len - len(ids)

    cut = generate(http_url, text, max_new_tokens=1, truncate=3, decoder_input_details=True)
    assert [t["id"] for t in cut["details"]["prefill"]] == ids[-3:]

    full = generate(http_url, text, max_new_tokens=2, return_full_text=True)
    assert full["generated_text"].startswith(text)

    sampled = generate(http_url, text, max_new_tokens=5, do_sample=True, details=True)
    seed = sampled["details"]["seed"]
    assert isinstance(seed, int)  # drawn by the server and reported, as TGI does
    again = generate(http_url, text, max_new_tokens=5, do_sample=True, seed=seed, details=True)
    assert again["details"]["tokens"] == sampled["details"]["tokens"]

    neutral = generate(
        http_url,
        text,
        max_new_tokens=2,
        best_of=1,
        repetition_penalty=1.0,
        frequency_penalty=0.0,
        grammar=None,
        adapter_id=None,
        typical_p=None,
        top_k=None,
        watermark=False,
        top_p=0.9,
        do_sample=True,
    )
    assert isinstance(neutral["generated_text"], str)


def test_info(http_url, client, backend) -> None:
    info = httpx.get(f"{http_url}/info").json()
    assert info["model_id"] == client.info().model_id
    assert info["max_total_tokens"] == backend.max_seq_len
    assert info["max_input_tokens"] == backend.max_seq_len - 1
    assert info["model_dtype"] == "torch.float32" and info["model_device_type"] == "cpu"
    assert info["max_best_of"] == 1 and info["max_stop_sequences"] == 4
    assert isinstance(info["version"], str) and isinstance(info["router"], str)


BAD = [
    ({"inputs": "x", "parameters": {"foo": 1}}, 422, "foo"),
    ({"inputs": "x", "extra": 1}, 422, "extra"),
    ({"inputs": "x", "parameters": {"max_new_tokens": "5"}}, 422, "max_new_tokens"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 2.5}}, 422, "max_new_tokens"),
    ({"inputs": "x", "parameters": {"temperature": "hot"}}, 422, "temperature"),
    ({"inputs": "x", "parameters": {"details": "yes"}}, 422, "details"),
    ({"inputs": "x", "parameters": {"stop": "a"}}, 422, "stop"),
    ({"inputs": "x", "parameters": {"watermark": True}}, 422, "watermark"),
    ({"parameters": {"max_new_tokens": 2}}, 422, "inputs"),
    ({"inputs": ""}, 422, "inputs"),
    ({"inputs": 5}, 422, "inputs"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 10**9}}, 422, "max_new_tokens"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 10**30}}, 422, "max_new_tokens"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, 422, "max_new_tokens"),
    ({"inputs": "x", "parameters": {"max_new_tokens": -1}}, 422, "max_new_tokens"),
    ({"inputs": "x", "stream": True}, 422, "stream"),
    ({"inputs": "x", "parameters": {"best_of": 2}}, 422, "best_of"),
    ({"inputs": "x", "parameters": {"typical_p": 0.5}}, 422, "typical_p"),
    ({"inputs": "x", "parameters": {"top_k": 10}}, 422, "top_k"),
    ({"inputs": "x", "parameters": {"repetition_penalty": 1.2}}, 422, "repetition_penalty"),
    ({"inputs": "x", "parameters": {"frequency_penalty": 0.5}}, 422, "frequency_penalty"),
    ({"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a+"}}}, 422, "grammar"),
    ({"inputs": "x", "parameters": {"adapter_id": "lora"}}, 422, "adapter_id"),
    ({"inputs": "x", "parameters": {"temperature": 0}}, 422, "temperature"),
    ({"inputs": "x", "parameters": {"top_p": 1.0}}, 422, "top_p"),
    ({"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, 422, "stop"),
    ({"inputs": "x", "parameters": {"stop": [""]}}, 422, "stop"),
    ({"inputs": "x", "parameters": {"truncate": 0}}, 422, "truncate"),
    ({"inputs": "x", "parameters": {"truncate": 10**6}}, 422, "truncate"),
    ({"inputs": "x", "parameters": {"top_n_tokens": 10**6}}, 422, "top_n_tokens"),
    ({"inputs": "x", "parameters": {"seed": -1}}, 422, "seed"),
    ({"inputs": "x", "parameters": {"seed": 2**64}}, 422, "seed"),
    ({"inputs": "Ada " * 600}, 422, "inputs"),
    ([1, 2], 422, "body"),
    ('{"inputs": "x", "parameters": {"temperature": NaN}}', 422, "temperature"),
    ('{"inputs": "\\ud800"}', 422, "inputs"),
    ('{"inputs": "x", ', 400, "JSON"),
    ("", 422, "body"),
]


@pytest.mark.parametrize("path", ["/", "/generate"])
def test_bad_input_is_a_4xx_naming_the_field(http_url, path) -> None:
    for body, status, field in BAD:
        if isinstance(body, str):
            response = httpx.post(
                f"{http_url}{path}", content=body, headers={"content-type": "application/json"}
            )
        else:
            response = httpx.post(f"{http_url}{path}", json=body)
        assert response.status_code == status, (body, response.text)
        error = response.json()
        assert set(error) == {"error", "error_type"}, error
        assert error["error_type"] == "validation"
        assert field in error["error"], (body, error)
