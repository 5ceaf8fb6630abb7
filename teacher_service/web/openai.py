"""The vLLM/OpenAI completions dialect: `POST /v1/completions` and `GET /v1/models`.

So that trainers written against a vLLM teacher (TRL's `VLLMClient`, OpenAI SDK clients)
work unchanged, on the engine and batcher that gRPC uses. The response has vLLM's shape
(vllm/entrypoints/openai/completion/protocol.py, serving.py):

- `prompt_logprobs`: per prompt token, the first null, then {token id (a JSON string):
  {"logprob", "rank", "decoded_token"}}: the actual token first, with its true rank over
  the whole vocabulary (even > k), then the top-k (ranks 1..k): k or k + 1 entries.
  With `echo` and no `prompt_logprobs`, k = `logprobs`, as in vLLM.
- `logprobs`: OpenAI's legacy lists (tokens, token_logprobs, top_logprobs = the actual
  token + the top-n, text_offset); with `echo` the prompt first, its first entry null.
  -inf goes out as -9999.0, as in vLLM (JSON has no infinity).

Choices made on purpose:
- `temperature` divides the logits for sampling AND for every log-prob returned. vLLM
  computes prompt log-probs from raw logits whatever the temperature, but TRL's
  `VLLMClient.get_sequence_logprobs` (trl/generation/vllm_client.py) sends it as "the
  temperature used when scoring the teacher distribution", and DESIGN.md agrees. The
  default 1 gives vLLM's raw numbers; 0 (greedy) is scored at 1.
- Generated tokens' log-probs come from scoring prompt + completion (same semantics).
- `max_tokens = 0` works without `echo` too (vLLM refuses it): a pure scoring call.
- No `seed`: a fresh one per request (as vLLM: new samples each time).
- Stop strings are applied after sampling: the completion keeps the tokens up to the one
  completing the first stop string; its text ends before it (vLLM's default).
- n = 1 only, no streaming; fields that would change the result are accepted at their
  neutral value only (TRL sends some), unknown ones refused: nothing silently ignored.
- A rank is 1 + the number of tokens strictly more likely (vLLM counts ties as ahead).
- Errors: OpenAI's {"error": {"message", "type", "param", "code"}} with `http_status`'s
  statuses: 422 invalid, 400 not JSON, 413 too large, 429 overloaded, 503 stopping.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import math
import re
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, NamedTuple

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from teacher_client.proto import teacher_pb2 as pb
from teacher_service.engine import Engine
from teacher_service.sampling import Completion, SamplingOptions
from teacher_service.scoring import SequenceScores
from teacher_service.validation import RequestError
from teacher_service.web.app import http_status

router = APIRouter(tags=["openai"])
STARTED = int(time.time())
MIN_LOGPROB = -9999.0
TokenId = Annotated[int, Field(ge=0)]
Count = Annotated[int, Field(ge=0)]
Position = dict[str, dict[str, Any]]
# accepted only at the value that changes nothing
NEUTRAL: dict[str, tuple[Any, ...]] = {
    **dict.fromkeys(("frequency_penalty", "presence_penalty", "min_p"), (0,)),
    **dict.fromkeys(("repetition_penalty", "best_of"), (1,)),
    "top_k": (0, -1),
    "suffix": ("",),
    "logit_bias": ({},),
}


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: Count | None = 16
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    logprobs: Count | None = None
    prompt_logprobs: Count | None = None
    echo: bool | None = False
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    stream: bool | None = False
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None


class InvalidField(Exception):
    """A refused request: HTTP status, message, and the body field it is about."""

    def __init__(self, param: str | None, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.param, self.message, self.status = param, message, status


class Finished(NamedTuple):
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    stop_reason: str | None  # the stop string, as vLLM reports it


def error_response(status: int, message: str, param: str | None) -> JSONResponse:
    kind = {429: "rate_limit_error", 503: "service_unavailable_error"}.get(status)
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    error = {"message": message, "type": kind, "param": param, "code": status}
    return JSONResponse(status_code=status, content={"error": error})


async def read_body(request: Request, engine: Engine) -> CompletionBody:
    """JSON -> CompletionBody, or InvalidField naming the first bad field."""
    raw = await request.body()
    limit = engine.config.limits.max_message_bytes
    if len(raw) > limit:
        raise InvalidField(None, f"the body has {len(raw)} bytes, over {limit}", 413)
    try:
        data = json.loads(raw)
    except ValueError as error:
        raise InvalidField(None, f"the body is not valid JSON: {error}", 400) from None
    try:
        return CompletionBody.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        loc, message = first["loc"], first["msg"]
        param = "".join([*map(str, loc[:1]), *(f"[{p}]" for p in loc[1:] if isinstance(p, int))])
        if first["type"] == "extra_forbidden":
            message = "unknown field (not part of the completions API served here)"
        elif loc[:1] == ("prompt",):
            message = "expected a string, a list of strings, token ids (>= 0) or lists of them"
        raise InvalidField(param or None, f"{param or 'body'}: {message}") from None


def tokenize(body: CompletionBody, engine: Engine) -> list[tuple[list[int], str | None]]:
    """Each prompt's token ids (a string is tokenized as vLLM does: special tokens added)."""
    prompt, vocab = body.prompt, engine.backend.vocab_size
    single = isinstance(prompt, str) or bool(prompt and isinstance(prompt[0], int))
    items = [prompt] if single else list(prompt)
    if not items:
        raise InvalidField("prompt", "prompt: empty; send at least one prompt")
    out = []
    for i, item in enumerate(items):
        where = "prompt" if single else f"prompt[{i}]"
        text = item if isinstance(item, str) else None
        ids = list(engine.backend.tokenizer(item)["input_ids"]) if text is not None else item
        if not ids:
            raise InvalidField(where, f"{where}: no tokens; at least one is required")
        bad = next((j for j, token in enumerate(ids) if token >= vocab), None)
        if bad is not None:
            message = f"{where}[{bad}] = {ids[bad]}: outside the vocabulary [0, {vocab})"
            raise InvalidField(f"{where}[{bad}]", message)
        out.append((ids, text))
    return out


def check(body: CompletionBody, prompts: list[list[int]], max_tokens: int, engine: Engine) -> None:
    """What the schema cannot say, before any work (so no proto field can overflow)."""
    if body.n != 1:
        raise InvalidField("n", f"n = {body.n}: only n = 1 is supported (repeat the prompt)")
    if body.stream:
        raise InvalidField("stream", "stream: streaming is not supported; send stream = false")
    for name, allowed in NEUTRAL.items():
        value = getattr(body, name)
        if value is not None and value not in allowed:
            raise InvalidField(name, f"{name} = {value!r}: only {allowed[0]!r} is supported")
    t, top_p = body.temperature, body.top_p
    if t is not None and not (math.isfinite(t) and t >= 0):
        raise InvalidField("temperature", f"temperature = {t}: must be >= 0 (0 is greedy)")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidField("top_p", f"top_p = {top_p}: must be in (0, 1]")
    if body.seed is not None and not -(2**63) <= body.seed < 2**64:
        raise InvalidField("seed", f"seed = {body.seed}: must fit 64 bits")
    vocab, max_len = engine.backend.vocab_size, engine.backend.max_seq_len
    for name in ("logprobs", "prompt_logprobs"):
        if (getattr(body, name) or 0) > vocab:
            raise InvalidField(name, f"{name} = {getattr(body, name)}: at most {vocab}")
    for i, ids in enumerate(prompts):
        if len(ids) + max_tokens > max_len:
            message = f"max_tokens = {max_tokens} + prompt {i}'s {len(ids)} tokens exceed"
            raise InvalidField("max_tokens", f"{message} max_model_len = {max_len}")


def translated(error: RequestError, index: list[int]) -> InvalidField:
    """An engine error in this dialect's field names (sequence n is prompt index[n])."""
    fields = r"(?:sequences|prompts)\[(\d+)\](?:\.token_ids)?"
    message = re.sub(fields, lambda m: f"prompt[{index[int(m[1])]}]", str(error))
    message = re.sub(r"\b(?:sequences|prompts)\b", "prompt", message)
    message = message.replace("max_new_tokens", "max_tokens")
    name = re.match(r"[a-z_]+(?:\[\d+\])*", message)
    param = name[0] if name and name[0].split("[")[0] in CompletionBody.model_fields else None
    return InvalidField(param, message, 413 if error.too_large else 422)


def seed(body: CompletionBody) -> int:
    """The request's seed, or a fresh one (vLLM samples anew for each unseeded request)."""
    return secrets.randbits(64) if body.seed is None else body.seed % 2**64


def fusable(
    body: CompletionBody,
    prompts: list[list[int]],
    max_tokens: int,
    top_k: int | None,
    engine: Engine,
) -> bool:
    """One token after prompts that are scored anyway (TRL's get_sequence_logprobs): the
    token is sampled from the scoring forward's last row instead of a second forward."""
    return (
        max_tokens == 1
        and body.logprobs is None
        and top_k is not None
        and all(len(ids) > 1 for ids in prompts)
        and getattr(engine.backend, "samples_while_scoring", False)
    )


async def generate(
    body: CompletionBody, prompts: list[list[int]], max_tokens: int, engine: Engine
) -> list[Completion]:
    if max_tokens == 0:
        return [Completion([], "length") for _ in prompts]
    request = pb.GenerateRequest(
        prompts=[pb.Prompt(token_ids=ids) for ids in prompts],
        max_new_tokens=max_tokens,
        ignore_eos=body.ignore_eos,
        seed=seed(body),
    )
    if body.temperature is not None:
        request.temperature = body.temperature
    if body.top_p is not None:
        request.top_p = body.top_p
    try:
        return await engine.generate(request)
    except RequestError as error:
        raise translated(error, list(range(len(prompts)))) from None


async def score(
    sequences: list[list[int]],
    first: int | list[int],
    top_k: int | None,
    t: float,
    engine: Engine,
    sample_next: SamplingOptions | None = None,
) -> list[SequenceScores | None]:
    """One engine call for all sequences, scored from `first` on, so they batch together;
    None where nothing is asked or there is nothing to score. `sample_next` also samples
    the token after each sequence in the same forward pass."""
    froms = [first] * len(sequences) if isinstance(first, int) else first
    index = [n for n, ids in enumerate(sequences) if froms[n] < len(ids)]
    results: list[SequenceScores | None] = [None] * len(sequences)
    if top_k is None or not index:
        return results
    request = pb.ScoreRequest(top_k=top_k, temperature=t)
    for n in index:
        request.sequences.add(token_ids=sequences[n], score_from=froms[n])
    try:
        answers = await engine.score(request, ranks=True, sample_next=sample_next)
        for n, result in zip(index, answers, strict=True):
            results[n] = result
    except RequestError as error:
        raise translated(error, index) from None
    return results


def finish(
    completion: Completion, stops: list[str], decode: Callable[[list[int]], str]
) -> Finished:
    """Cut at the first stop string: keep the fewest tokens whose text holds it."""
    ids, text = completion.token_ids, decode(completion.token_ids)
    hits = sorted((text.find(stop), stop) for stop in stops if stop and stop in text)
    if not hits:
        return Finished(ids, text, "stop" if completion.finish_reason == "eos" else "length", None)
    at, stop = hits[0]
    low, high = 1, len(ids)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if stop in decode(ids[:middle]) else (middle + 1, high)
    return Finished(ids[:low], text[:at], "stop", stop)


def position_dicts(
    scores: SequenceScores | None, ids: list[int], k: int, decoded: Callable[[int], str]
) -> list[Position | None]:
    """vLLM's dict per position, None where not scored: the actual token with its true
    rank, then the top-k with ranks 1..k (a top-k entry wins a tie, as in vLLM's dict)."""
    rows = 0 if scores is None else len(scores.target_logprobs)
    out: list[Position | None] = [None] * (len(ids) - rows)
    if scores is None:
        return out
    target, ranks = scores.target_logprobs.float().tolist(), scores.target_ranks.tolist()
    has_top = k > 0 and scores.topk_ids is not None
    top_ids = scores.topk_ids[:, :k].tolist() if has_top else [[]] * rows
    top = scores.topk_logprobs[:, :k].float().tolist() if has_top else [[]] * rows

    def entry(token: int, logprob: float, rank: int) -> dict[str, Any]:
        logprob = logprob if logprob > MIN_LOGPROB else MIN_LOGPROB  # -inf, NaN
        return {"logprob": logprob, "rank": rank, "decoded_token": decoded(token)}

    for row, token in enumerate(ids[len(ids) - rows :]):
        position = {str(token): entry(token, target[row], ranks[row])}
        for rank, (top_id, logprob) in enumerate(zip(top_ids[row], top[row]), 1):
            position[str(top_id)] = entry(top_id, logprob, rank)
        out.append(position)
    return out


def legacy_logprobs(
    ids: list[int], positions: list[Position | None], name: Callable[[int], str]
) -> dict[str, list]:
    """OpenAI's completions `logprobs` for these tokens and their positions' dicts."""
    tokens = [name(token) for token in ids]
    return {
        "tokens": tokens,
        "token_logprobs": [p and p[str(t)]["logprob"] for t, p in zip(ids, positions)],
        "top_logprobs": [
            p and {name(int(t)): e["logprob"] for t, e in p.items()} for p in positions
        ],
        "text_offset": list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0)),
    }


async def complete(body: CompletionBody, engine: Engine) -> bytes:
    """Validate, sample, score (one engine call), then render the JSON off the event loop
    (a large top-k response is seconds of Python that would stall every other client)."""
    prompts = tokenize(body, engine)
    ids_list = [ids for ids, _ in prompts]
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    check(body, ids_list, max_tokens, engine)
    prompt_k = body.prompt_logprobs
    if prompt_k is None and body.echo:
        prompt_k = body.logprobs  # vLLM: echo returns the prompt's log-probs at `logprobs`
    top_k = max((k for k in (prompt_k, body.logprobs) if k is not None), default=None)
    temperature = body.temperature or 1.0

    def decode(ids: list[int]) -> str:
        return engine.backend.tokenizer.decode(ids, skip_special_tokens=True)

    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if body.logprobs is not None and max_tokens > 0:  # the completion's log-probs: after it
        sampled = await generate(body, ids_list, max_tokens, engine)
        finished = [finish(c, stops, decode) for c in sampled]
        sequences = [ids + f.token_ids for ids, f in zip(ids_list, finished)]
        first = 1 if prompt_k is not None else [len(ids) for ids in ids_list]
        scores = await score(sequences, first, top_k, temperature, engine)
    elif fusable(body, ids_list, max_tokens, top_k, engine):  # TRL's request: one forward
        options = SamplingOptions(
            1,
            1.0 if body.temperature is None else body.temperature,
            1.0 if body.top_p is None else body.top_p,
            seed(body),
        )
        scores = await score(ids_list, 1, top_k, temperature, engine, sample_next=options)
        eos = set() if body.ignore_eos else engine.backend.eos_ids
        sampled = [
            Completion([s.next_token_id], "eos" if s.next_token_id in eos else "length")
            for s in scores
        ]
        finished, sequences = [finish(c, stops, decode) for c in sampled], ids_list
    else:  # the prompts' log-probs need not wait for sampling: both at once
        both = await asyncio.gather(
            generate(body, ids_list, max_tokens, engine),
            score(ids_list, 1, top_k, temperature, engine),
            return_exceptions=True,  # wait for both, then raise the first failure
        )
        for outcome in both:
            if isinstance(outcome, BaseException):
                raise outcome
        finished, scores = [finish(c, stops, decode) for c in both[0]], both[1]
        sequences = ids_list
    args = (body, engine, prompts, finished, sequences, scores, prompt_k)
    return await asyncio.to_thread(render, *args)


def render(
    body: CompletionBody,
    engine: Engine,
    prompts: list[tuple[list[int], str | None]],
    finished: list[Finished],
    sequences: list[list[int]],
    scores: list[SequenceScores | None],
    prompt_k: int | None,
) -> bytes:
    """The text_completion object; sequences[i] holds prompt i (+ its completion if scored)."""
    tokenizer = engine.backend.tokenizer
    decoded = functools.lru_cache(maxsize=None)(lambda token: tokenizer.decode([token]))
    name = (lambda token: f"token_id:{token}") if body.return_tokens_as_token_ids else decoded
    choices = []
    for i, ((ids, text), done) in enumerate(zip(prompts, finished)):
        legacy = prompt_logprobs = None
        if body.logprobs is not None:
            positions = position_dicts(scores[i], sequences[i], body.logprobs, decoded)
            start = 0 if body.echo else len(ids)
            legacy = legacy_logprobs(sequences[i][start:], positions[start:], name)
        if prompt_k is not None:
            positions = position_dicts(scores[i], sequences[i], prompt_k, decoded)
            prompt_logprobs = positions[: len(ids)]
        prompt_text = text if text is not None else tokenizer.decode(ids)
        choices.append(
            {
                "index": i,
                "text": prompt_text + done.text if body.echo else done.text,
                "logprobs": legacy,
                "finish_reason": done.finish_reason,
                "stop_reason": done.stop_reason,
                "token_ids": done.token_ids if body.return_token_ids else None,
                "prompt_logprobs": prompt_logprobs,
                "prompt_token_ids": ids if body.return_token_ids else None,
            }
        )
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    completion_tokens = sum(len(f.token_ids) for f in finished)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    usage["total_tokens"] = prompt_tokens + completion_tokens
    response = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion"}
    response |= {"created": int(time.time()), "model": engine.backend.model_id}
    response |= {"choices": choices, "usage": usage}
    return json.dumps(response, ensure_ascii=False, allow_nan=False).encode()


_SCHEMA = {"application/json": {"schema": CompletionBody.model_json_schema()}}


@router.post("/v1/completions", openapi_extra={"requestBody": {"content": _SCHEMA}})
async def completions(request: Request) -> Response:
    """Completions with the teacher's log-probs (vLLM's `prompt_logprobs` included)."""
    engine: Engine = request.app.state.engine
    try:
        content = await complete(await read_body(request, engine), engine)
        return Response(content, media_type="application/json")
    except InvalidField as error:
        return error_response(error.status, error.message, error.param)
    except Exception as error:
        status, message = http_status(error)
        return error_response(status, message, None)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """The served model, as vLLM lists it (TRL's VLLMClient reads data[0].id)."""
    backend = request.app.state.engine.backend
    card = {"id": backend.model_id, "object": "model", "created": STARTED}
    card |= {"owned_by": "teacher-service", "root": backend.model_id, "parent": None}
    return {"object": "list", "data": [{**card, "max_model_len": backend.max_seq_len}]}
