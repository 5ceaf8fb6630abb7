"""The vLLM/OpenAI chat dialect: `POST /v1/chat/completions`.

The messages are rendered with the teacher's chat template, or the request's
`chat_template` (vLLM's field), with `add_generation_prompt` (default true), and the text
is tokenized without adding special tokens (vLLM's default `add_special_tokens = false`:
the template writes them). That prompt is then served exactly as /v1/completions serves
it (web/openai.py: the same body, checks, choices, seeds and engine calls), and answered
in vLLM's chat shape (vllm/entrypoints/openai/chat_completion/protocol.py, serving.py):

- `choices[j].message` = {"role": "assistant", "content", "tool_calls": []}, with
  `finish_reason`, `stop_reason` and (`return_token_ids`) `token_ids`.
- `choices[j].logprobs.content[i]` = {"token", "logprob", "bytes", "top_logprobs"} for
  generated token i, `top_logprobs` being the `top_logprobs` most likely tokens, most likely
  first, each {"token", "logprob", "bytes"} (`bytes`: the UTF-8 of the decoded token).
- `prompt_logprobs` (vLLM's extra field, top level: one prompt for all choices) and
  (`return_token_ids`) `prompt_token_ids`, as /v1/completions gives them per choice.

Refused, naming the field: a model without a chat template and no `chat_template` (400,
as vLLM), a template that does not render the messages (400), `top_logprobs` without
`logprobs` (vLLM's rule), content parts other than text, tools, response formats other
than text, `echo`, streaming. Without `max_completion_tokens` / `max_tokens` the
completion may run to the model's length (vLLM's default).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, ConfigDict

from teacher_service import validation
from teacher_service.backend_api import Backend
from teacher_service.engine import Engine
from teacher_service.errors import RequestError
from teacher_service.frontends.http.body import read_body
from teacher_service.frontends.http.openai import (
    Choice,
    CompletionBody,
    Count,
    SamplingFields,
    Tokenized,
    check_model,
    draw_choices,
    position_dicts,
    refuse_non_neutral,
    wire,
)
from teacher_service.frontends.http.openai_errors import ChatTemplateError, error_response
from teacher_service.requests import Names
from teacher_service.scoring import SequenceScores

router = APIRouter(tags=["openai"])
# chat's own fields, accepted only at the value that changes nothing
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
    "echo": (False,),
}


def _text(content: Any) -> Any:
    """OpenAI's content: a string, null, or text parts, joined by newlines (vLLM's
    "string" content format); anything else is refused here, naming the message."""
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return "\n".join(part["text"] for part in content)
    if content is None or isinstance(content, str):
        return content
    raise ValueError(
        'expected a string, null or a list of text parts ({"type": "text", "text": ...}); '
        "only text is served"
    )


class Message(BaseModel):
    """One message; its other keys (name, tool_calls, ...) reach the template as sent."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: Annotated[str | None, BeforeValidator(_text)] = None


class ChatBody(SamplingFields):
    messages: list[Message]
    max_completion_tokens: Count | None = None
    max_tokens: Count | None = None  # OpenAI's older name
    logprobs: bool | None = False
    top_logprobs: Count | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None  # true unless continue_final_message
    continue_final_message: bool = False
    add_special_tokens: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    echo: bool | None = None

    @property
    def max_field(self) -> str:
        """The field that bounds the completion, as errors name it."""
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    def check(self, backend: Backend) -> None:
        """Chat's own fields; the rest is checked as /v1/completions checks it."""
        check_model(self.model, backend)
        if not self.messages:
            raise RequestError("messages: empty; send at least one message", field="messages")
        refuse_non_neutral(self, NEUTRAL)
        if self.top_logprobs and not self.logprobs:
            raise RequestError(
                f"top_logprobs = {self.top_logprobs}: needs logprobs = true", field="top_logprobs"
            )
        if (self.top_logprobs or 0) > backend.vocab_size:
            raise RequestError(
                f"top_logprobs = {self.top_logprobs}: at most {backend.vocab_size}",
                field="top_logprobs",
            )
        if self.continue_final_message and self.add_generation_prompt:
            raise RequestError(
                "continue_final_message: cannot be true with add_generation_prompt = true",
                field="continue_final_message",
            )

    def prompt_ids(self, backend: Backend, trust_request_template: bool) -> list[int]:
        """The messages through the chat template, tokenized as vLLM does."""
        tokenizer = backend.tokenizer
        if self.chat_template is not None and not trust_request_template:
            raise ChatTemplateError(
                "chat_template: this service renders the model's own template only (serve "
                "--trust-request-chat-template to take a request's); leave the field out",
                field="chat_template",
            )
        if self.chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"chat_template: the model `{backend.model_id}` has no chat template; send "
                "one as `chat_template` (a Jinja template, as tokenizer_config.json holds)",
                field="chat_template",
            )
        kwargs = self.chat_template_kwargs or {}
        taken = set(inspect.signature(tokenizer.apply_chat_template).parameters)
        for key in kwargs:
            if key in taken:
                raise RequestError(
                    f"chat_template_kwargs.{key}: an argument of apply_chat_template itself, "
                    "not the template's",
                    field=f"chat_template_kwargs.{key}",
                )
        try:
            text = tokenizer.apply_chat_template(
                [message.model_dump() for message in self.messages],
                chat_template=self.chat_template,
                add_generation_prompt=self.add_generation_prompt is not False
                and not self.continue_final_message,
                continue_final_message=self.continue_final_message,
                tokenize=False,
                **kwargs,
            )
        except jinja2.TemplateSyntaxError as error:
            raise ChatTemplateError(
                f"chat_template: not a valid Jinja template: {error}", field="chat_template"
            ) from None
        except (jinja2.TemplateError, ValueError, TypeError) as error:
            raise ChatTemplateError(
                f"messages: the chat template does not render them: {error}", field="messages"
            ) from None
        ids = tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"]
        return validation.token_ids(ids, "messages", backend.vocab_size).tolist()

    def new_tokens(self, prompt_len: int, max_len: int) -> int:
        """The completion's bound: the field sent, else what the model's length leaves."""
        sent = self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
        if sent is None and prompt_len >= max_len:
            raise RequestError(
                f"messages: {prompt_len} tokens after the chat template leave no room "
                f"in max_model_len = {max_len}",
                field="messages",
            )
        if sent is not None and prompt_len + sent > max_len:
            raise RequestError(
                f"{self.max_field} = {sent} + the messages' {prompt_len} tokens exceed "
                f"max_model_len = {max_len}",
                field=self.max_field,
            )
        return max_len - prompt_len if sent is None else sent

    def to_completion_body(self, ids: list[int], new_tokens: int) -> CompletionBody:
        """The /v1/completions request for this prompt, its errors naming chat's fields."""
        shared = {name: getattr(self, name) for name in SamplingFields.model_fields}
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        body = CompletionBody(prompt=ids, max_tokens=new_tokens, logprobs=logprobs, **shared)
        names = Names(
            sequences="messages",
            token_ids="",
            score_from="",
            candidate_ids="",
            max_new_tokens=self.max_field,
        )
        return body.named(names)


def _describe(problems: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The first problem, its field as OpenAI's `param` (`messages[1].content`)."""
    first = problems[0]
    loc, message = first["loc"], first["msg"]
    inside = loc[:1] == ("messages",)  # elsewhere a name after the field is a union's branch
    steps = (f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    param = "".join([*map(str, loc[:1]), *(s for s in steps if inside or s[0] == "[")])
    if first["type"] == "extra_forbidden":
        message = "unknown field (not part of the chat completions API served here)"
    return f"{param or 'body'}: {message}", param or None


def content_logprobs(
    scores: SequenceScores | None,
    tokens: list[int],
    k: int,
    name: Callable[[int], str],
    decoded: Callable[[int], str],
) -> list[dict[str, Any]]:
    """OpenAI's chat `logprobs.content`: each generated token (the last rows scored) with
    the k most likely tokens at its position."""
    if not tokens or scores is None:
        return []
    first = len(scores.target_logprobs) - len(tokens)
    target = scores.target_logprobs[first:].float().tolist()
    has_top = k > 0 and scores.topk_ids is not None
    top_ids = scores.topk_ids[first:, :k].tolist() if has_top else [[]] * len(tokens)
    top = scores.topk_logprobs[first:, :k].float().tolist() if has_top else [[]] * len(tokens)

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = decoded(token).encode("utf-8", errors="replace")
        return {"token": name(token), "logprob": wire(logprob), "bytes": list(text)}

    return [
        entry(token, logprob) | {"top_logprobs": [entry(t, v) for t, v in zip(ids, values)]}
        for token, logprob, ids, values in zip(tokens, target, top_ids, top)
    ]


def render(
    body: ChatBody, completion: CompletionBody, engine: Engine, ids: list[int], draws: list[Choice]
) -> bytes:
    """The chat.completion object: choice j is draws[j] (seed s + j, as /v1/completions)."""
    tokenizer = engine.backend.tokenizer
    decoded = functools.lru_cache(maxsize=None)(lambda token: tokenizer.decode([token]))
    name = (lambda token: f"token_id:{token}") if body.return_tokens_as_token_ids else decoded
    choices = []
    for j, draw in enumerate(draws):
        done, scores = draw.finished[0], draw.scores[0]
        logprobs = None
        if completion.logprobs is not None:
            content = content_logprobs(scores, done.token_ids, completion.logprobs, name, decoded)
            logprobs = {"content": content}
        choices.append(
            {
                "index": j,
                "message": {"role": "assistant", "content": done.text, "tool_calls": []},
                "logprobs": logprobs,
                "finish_reason": done.finish_reason,
                "stop_reason": done.stop_reason,
                "token_ids": done.token_ids if body.return_token_ids else None,
            }
        )
    prompt_logprobs = None
    if completion.prompt_k is not None:  # the prompt is every choice's: choice 0's scoring
        scored = draws[0]
        positions = position_dicts(
            scored.scores[0], scored.sequences[0], completion.prompt_k, decoded
        )
        prompt_logprobs = positions[: len(ids)]
    completion_tokens = sum(len(draw.finished[0].token_ids) for draw in draws)
    usage = {"prompt_tokens": len(ids), "completion_tokens": completion_tokens}
    usage["total_tokens"] = len(ids) + completion_tokens
    response = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion"}
    response |= {"created": int(time.time()), "model": engine.backend.model_id}
    response |= {"choices": choices, "usage": usage, "prompt_logprobs": prompt_logprobs}
    response["prompt_token_ids"] = ids if body.return_token_ids else None
    return json.dumps(response, ensure_ascii=False, allow_nan=False).encode()


async def chat(body: ChatBody, engine: Engine) -> bytes:
    """Check, render the prompt, then draw and render as /v1/completions does."""
    backend = engine.backend
    body.check(backend)
    ids = body.prompt_ids(backend, engine.config.trust_request_chat_template)
    completion = body.to_completion_body(ids, body.new_tokens(len(ids), backend.max_seq_len))
    prompts = [Tokenized(ids, None, "messages")]
    completion.check(prompts, backend, engine.config.limits)
    draws = await draw_choices(completion, prompts, engine)
    return await asyncio.to_thread(render, body, completion, engine, ids, draws)


_SCHEMA = {"application/json": {"schema": ChatBody.model_json_schema()}}


@router.post("/v1/chat/completions", openapi_extra={"requestBody": {"content": _SCHEMA}})
async def chat_completions(request: Request) -> Response:
    """Chat completions with the teacher's log-probs (vLLM's `prompt_logprobs` included)."""
    try:
        body = await read_body(request, ChatBody, _describe)
        content = await chat(body, request.app.state.engine)
    except Exception as error:
        return error_response(error)
    return Response(content, media_type="application/json")
