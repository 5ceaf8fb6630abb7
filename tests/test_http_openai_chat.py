"""The vLLM/OpenAI chat dialect (/v1/chat/completions) with the official openai SDK, held
against an in-process forward of the model and against /v1/completions of the same prompt.

The tiny model's copies are served with a chat template of their own in tokenizer_config.json
(`TEMPLATE`, from tokens its byte-level vocabulary has, trusting request templates) and with
none (answering the missing-template error and refusing a request's template, by default).
"""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
import torch

from teacher_service.backend import HFBackend
from tests.conftest import reference_logprobs, start_background_server

openai = pytest.importorskip("openai")

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Count."},
    {"role": "user", "content": "Ada has 12 apples."},
]
# the template above, written out by hand: what the server must render and tokenize
RENDERED = "system: Count.\nuser: Ada has 12 apples.\nassistant:"


def _copy_with_template(tiny_model_dir, tmp_path_factory, name: str, template: str | None):
    """The tiny model under `name`, its tokenizer's chat template set (None: removed)."""
    model_dir = tmp_path_factory.mktemp(name) / name
    shutil.copytree(tiny_model_dir, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config | ({"chat_template": template} if template else {})))
    backend = HFBackend.load(model_dir, device="cpu", dtype="float32")
    assert getattr(backend.tokenizer, "chat_template", None) == template
    return model_dir, backend


@pytest.fixture(scope="module")
def chat_url(tiny_model_dir, tmp_path_factory):
    """A server of the tiny model with TEMPLATE as its tokenizer's chat template, trusting
    request templates."""
    model_dir, backend = _copy_with_template(
        tiny_model_dir, tmp_path_factory, "tiny-chat", TEMPLATE
    )
    running = start_background_server(
        model_dir, backend, max_wait_ms=2.0, http_port=0, trust_request_chat_template=True
    )
    yield running.http_url
    running.stop()


@pytest.fixture(scope="module")
def plain_sdk(tiny_model_dir, tmp_path_factory):
    """A server of the tiny model with no chat template, with the service's defaults."""
    model_dir, backend = _copy_with_template(tiny_model_dir, tmp_path_factory, "tiny-plain", None)
    running = start_background_server(model_dir, backend, max_wait_ms=2.0, http_port=0)
    base_url = f"{running.http_url}/v1"
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        yield client
    running.stop()


@pytest.fixture(scope="module")
def chat_sdk(chat_url):
    with openai.OpenAI(base_url=f"{chat_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def token_id(name: str) -> int:
    return int(name.removeprefix("token_id:"))


def test_logprobs_and_prompt_logprobs_equal_an_in_process_forward(chat_sdk, backend, tokenizer):
    k = 3
    got = chat_sdk.chat.completions.create(
        model="tiny-chat",
        messages=MESSAGES,
        max_completion_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=k,
        extra_body={
            "prompt_logprobs": k,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
        },
    )
    prompt = tokenizer(RENDERED)["input_ids"]  # <bos> from the tokenizer, not the template
    assert got.object == "chat.completion" and got.model_extra["prompt_token_ids"] == prompt
    (choice,) = got.choices
    tokens = choice.model_extra["token_ids"]
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(tokens, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if tokens[-1] == tokenizer.eos_token_id else "length")
    reference = reference_logprobs(backend, prompt + tokens)
    differences = []
    for j, (token, item) in enumerate(zip(tokens, choice.logprobs.content, strict=True)):
        row = reference[len(prompt) - 1 + j]
        assert token == int(row.argmax())  # greedy
        assert item.token == f"token_id:{token}"
        assert item.bytes == list(tokenizer.decode([token]).encode())
        differences.append(abs(item.logprob - float(row[token])))
        want = torch.topk(row, k)
        assert [token_id(top.token) for top in item.top_logprobs] == want.indices.tolist()
        differences += [abs(t.logprob - float(v)) for t, v in zip(item.top_logprobs, want.values)]
    positions = got.model_extra["prompt_logprobs"]
    assert len(positions) == len(prompt) and positions[0] is None
    for p in range(1, len(prompt)):
        row, entries = reference[p - 1], positions[p]
        differences.append(abs(entries[str(prompt[p])]["logprob"] - float(row[prompt[p]])))
        top = sorted(
            (e["rank"], int(t), e["logprob"]) for t, e in entries.items() if e["rank"] <= k
        )
        want = torch.topk(row, k)
        assert [t for _, t, _ in top[:k]] == want.indices.tolist()
        differences += [abs(v - float(w)) for (_, _, v), w in zip(top, want.values)]
    print(f"max |served - in-process forward| = {max(differences):.2e}")
    assert max(differences) < 1e-5
    assert got.usage.prompt_tokens == len(prompt)
    assert got.usage.completion_tokens == len(tokens)


def test_choices_are_the_completions_of_the_rendered_prompt(chat_sdk, chat_url):
    """Sampled, n = 2, seeded: each choice is /v1/completions' choice for the same prompt."""
    fields = {"temperature": 0.9, "seed": 3, "n": 2, "stop": ["zz"]}
    got = chat_sdk.chat.completions.create(
        model=chat_sdk.models.list().data[0].id,
        messages=MESSAGES,
        max_completion_tokens=5,
        logprobs=True,
        top_logprobs=2,
        extra_body={"prompt_logprobs": 2, "return_token_ids": True},
        **fields,
    )
    prompt = got.model_extra["prompt_token_ids"]
    body = {"prompt": prompt, "max_tokens": 5, "logprobs": 2, "prompt_logprobs": 2, **fields}
    answer = httpx.post(
        f"{chat_url}/v1/completions", json={**body, "return_token_ids": True}, timeout=60
    )
    want = answer.json()["choices"]
    assert [c.index for c in got.choices] == [0, 1]
    assert got.choices[0].model_extra["token_ids"] != got.choices[1].model_extra["token_ids"]
    for choice, expected in zip(got.choices, want, strict=True):
        assert choice.model_extra["token_ids"] == expected["token_ids"]
        assert choice.message.content == expected["text"]
        assert choice.finish_reason == expected["finish_reason"]
        legacy = expected["logprobs"]
        assert [item.token for item in choice.logprobs.content] == legacy["tokens"]
        np.testing.assert_allclose(
            [item.logprob for item in choice.logprobs.content], legacy["token_logprobs"], atol=1e-5
        )
        for item, top in zip(choice.logprobs.content, legacy["top_logprobs"]):
            assert len(item.top_logprobs) == 2
            for entry in item.top_logprobs:
                assert entry.logprob == pytest.approx(top[entry.token], abs=1e-5)
    served = got.model_extra["prompt_logprobs"]
    for mine, theirs in zip(served[1:], want[0]["prompt_logprobs"][1:], strict=True):
        assert mine.keys() == theirs.keys()
        for token, entry in mine.items():
            assert entry["logprob"] == pytest.approx(theirs[token]["logprob"], abs=1e-5)
    completion_tokens = sum(len(c["token_ids"]) for c in want)
    assert got.usage.completion_tokens == completion_tokens
    assert got.usage.prompt_tokens == len(prompt)


def test_an_assistant_reply_is_scored_with_the_requests_chat_template(
    chat_sdk, client, backend, tokenizer
):
    """A service that trusts request templates (chat_url's) renders the request's; the reply
    is scored (add_generation_prompt off, nothing generated), as a distillation trainer
    would."""
    messages = [*MESSAGES, {"role": "assistant", "content": "Ada has 13."}]
    got = chat_sdk.chat.completions.create(
        model="tiny-chat",
        messages=messages,
        max_completion_tokens=0,
        extra_body={
            "chat_template": TEMPLATE,
            "add_generation_prompt": False,
            "prompt_logprobs": 0,
            "return_token_ids": True,
        },
    )
    ids = tokenizer(RENDERED + " Ada has 13.\n")["input_ids"]
    assert got.model_extra["prompt_token_ids"] == ids
    assert got.choices[0].message.content == "" and got.choices[0].logprobs is None
    assert got.usage.completion_tokens == 0
    reference = reference_logprobs(backend, ids)
    positions = got.model_extra["prompt_logprobs"]
    for p in range(1, len(ids)):
        assert list(positions[p]) == [str(ids[p])]  # k = 0: the actual token alone
        assert positions[p][str(ids[p])]["logprob"] == pytest.approx(
            float(reference[p - 1, ids[p]]), abs=1e-5
        )


def test_a_requests_chat_template_is_refused_unless_the_service_trusts_them(plain_sdk):
    """With the default, a template in the request is a 400 that names the field and the
    flag, and nothing is rendered."""
    with pytest.raises(openai.BadRequestError) as raised:
        plain_sdk.chat.completions.create(
            model="tiny-plain",
            messages=MESSAGES,
            max_completion_tokens=1,
            extra_body={"chat_template": TEMPLATE},
        )
    assert raised.value.param == "chat_template"
    assert "--trust-request-chat-template" in raised.value.body["message"]


def test_a_model_without_a_chat_template_is_a_400_naming_it(plain_sdk):
    with pytest.raises(openai.BadRequestError) as raised:
        plain_sdk.chat.completions.create(
            model="tiny-plain", messages=MESSAGES, max_completion_tokens=1
        )
    error = raised.value
    assert error.status_code == 400 and error.param == "chat_template"
    assert "`tiny-plain` has no chat template" in error.body["message"]


M = {"messages": [{"role": "user", "content": "hi"}]}
BAD = [
    ({"messages": []}, 422, "messages"),
    ({}, 422, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        422,
        "messages[0].content",
    ),
    ({"messages": [M["messages"][0], {"content": "hi"}]}, 422, "messages[1].role"),
    ({"messages": [{"role": "user", "content": " 7" * 600}]}, 422, "messages"),
    ({**M, "temprature": 1.0}, 422, "temprature"),
    ({**M, "top_logprobs": 2}, 422, "top_logprobs"),
    ({**M, "logprobs": True, "top_logprobs": 10**6}, 422, "top_logprobs"),
    ({**M, "max_completion_tokens": 10**6}, 422, "max_completion_tokens"),
    ({**M, "max_tokens": 10**6}, 422, "max_tokens"),
    ({**M, "max_completion_tokens": -1}, 422, "max_completion_tokens"),
    ({**M, "prompt_logprobs": -1}, 422, "prompt_logprobs"),
    ({**M, "stop": 5}, 422, "stop"),
    ({**M, "n": 0}, 422, "n"),
    ({**M, "stream": True}, 422, "stream"),
    ({**M, "temperature": -1.0}, 422, "temperature"),
    ({**M, "frequency_penalty": 0.5}, 422, "frequency_penalty"),
    ({**M, "tools": [{"type": "function", "function": {"name": "f"}}]}, 422, "tools"),
    ({**M, "response_format": {"type": "json_object"}}, 422, "response_format"),
    ({**M, "echo": True}, 422, "echo"),
    ({**M, "chat_template_kwargs": {"tokenize": True}}, 422, "chat_template_kwargs.tokenize"),
    (
        {**M, "add_generation_prompt": True, "continue_final_message": True},
        422,
        "continue_final_message",
    ),
    ({**M, "chat_template": "{% for %}"}, 400, "chat_template"),
    ({**M, "chat_template": "{{ raise_exception('roles must alternate') }}"}, 400, "messages"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_input_names_the_field(chat_url, body, status, param):
    answer = httpx.post(f"{chat_url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["code"] == status
    assert error["type"] == ("BadRequestError" if status == 400 else "invalid_request_error")
    assert error["message"].startswith(param)


def test_an_unknown_model_is_vllms_404(chat_sdk):
    with pytest.raises(openai.NotFoundError) as raised:
        chat_sdk.chat.completions.create(model="other", messages=MESSAGES)
    assert raised.value.body == {
        "message": "The model `other` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
