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
  temperature used when scoring the teacher distribution", and docs/design.md agrees. The
  default 1 gives vLLM's raw numbers; 0 (greedy) is scored at 1.
- Generated tokens' log-probs come from scoring prompt + completion (same semantics).
- `max_tokens = 0` works without `echo` too (vLLM refuses it): a pure scoring call.
- No `seed`: a fresh one per request (as vLLM: new samples each time).
- `n` > 1: choice j of prompt i (index i * n + j, vLLM's order) is exactly what the same
  request with n = 1 and seed (s + j) mod 2**64 returns for prompt i, s being the seed
  (or the one drawn): its tokens, its `logprobs` and its `prompt_logprobs`. So choice 0
  is the n = 1 answer, and a seeded request repeats all n. The n draws run as n requests
  would (their scoring batched together): `prompt_logprobs` cost n prompt scorings.
  n x prompts is capped by max_sequences_per_request (413).
- An unknown `model` is 404 with vLLM's body: "The model `X` does not exist.", type
  NotFoundError, param "model" (this dialect's word for errors.py's invalid_argument).
- Stop strings are applied after sampling: the completion keeps the tokens up to the one
  completing the first stop string; its text ends before it (vLLM's default).
- No streaming; fields that would change the result are accepted at their neutral
  value only (TRL sends some), unknown ones refused: nothing silently ignored.
- A rank is 1 + the number of tokens strictly more likely (vLLM counts ties as ahead).
- Errors: OpenAI's {"error": {"message", "type", "param", "code"}} (openai_errors.py), with
  errors.STATUS's statuses: 422 invalid, 400 not JSON, 413 too large, 429 overloaded, 503
  stopping. The engine is told each sequence's name (`prompt[1]`), so its errors name the
  body's fields.

Laid out as vLLM's entrypoints are: the body with its `to_...()` conversions into the
engine's requests, the serving function (`complete`, then `render`), the router.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, NamedTuple

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from causal_lm.sampling import Completion, SamplingOptions
from teacher_service import validation
from teacher_service.backend_api import Backend
from teacher_service.config import Limits
from teacher_service.engine import Engine
from teacher_service.errors import ErrorKind, RequestError
from teacher_service.frontends.http.body import read_body
from teacher_service.frontends.http.openai_errors import ModelNotFound, error_response
from teacher_service.requests import GenerateRequest, Names, Prompt, ScoreRequest, Sequence
from teacher_service.scoring import SequenceScores

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


# the engine's errors name the body's fields: a sequence is `prompt[i]` (or `prompt`)
NAMES = Names(
    sequences="prompt", token_ids="", score_from="", candidate_ids="", max_new_tokens="max_tokens"
)


class Tokenized(NamedTuple):
    """One prompt: its ids, its text (None when sent as ids) and its name in the body."""

    ids: list[int]
    text: str | None
    path: str


class SamplingFields(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share, with vLLM's meaning: a
    chat request reaches the engine as a completions request of these (openai_chat.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    prompt_logprobs: Count | None = None
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
    logit_bias: dict[str, float] | None = None


class CompletionBody(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: Count | None = 16
    logprobs: Count | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    # what the engine's errors call the fields: the chat dialect's body names them its way
    _names: Names = PrivateAttr(default=NAMES)

    def named(self, names: Names) -> CompletionBody:
        """This body, the engine's errors naming its fields `names` (another body's terms)."""
        self._names = names
        return self

    @property
    def new_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

    @property
    def prompt_k(self) -> int | None:
        """k of the prompts' log-probs; vLLM: `echo` returns them at `logprobs`."""
        return self.logprobs if self.prompt_logprobs is None and self.echo else self.prompt_logprobs

    def tokenized(self, backend: Backend) -> list[Tokenized]:
        """Each prompt's token ids (a string is tokenized as vLLM does: special tokens added)."""
        prompt = self.prompt
        single = isinstance(prompt, str) or bool(prompt and isinstance(prompt[0], int))
        items = [prompt] if single else list(prompt)
        if not items:
            raise RequestError("prompt: empty; send at least one prompt", field="prompt")
        out = []
        for i, item in enumerate(items):
            path = "prompt" if single else f"prompt[{i}]"
            text = item if isinstance(item, str) else None
            ids = backend.tokenizer(item)["input_ids"] if text is not None else item
            checked = validation.token_ids(ids, path, backend.vocab_size)
            out.append(Tokenized(checked.tolist(), text, path))
        return out

    def check_model(self, backend: Backend) -> None:
        check_model(self.model, backend)

    def check(self, prompts: list[Tokenized], backend: Backend, limits: Limits) -> None:
        """What the schema cannot say, before any work."""
        if self.n < 1:
            raise RequestError(f"n = {self.n}: must be >= 1", field="n")
        if self.n * len(prompts) > limits.max_sequences_per_request:
            raise RequestError(
                f"n = {self.n} choices x {len(prompts)} prompts: over "
                f"max_sequences_per_request = {limits.max_sequences_per_request}",
                field="n",
                kind=ErrorKind.TOO_LARGE,
            )
        if self.stream:
            raise RequestError(
                "stream: streaming is not supported; send stream = false", field="stream"
            )
        refuse_non_neutral(self, NEUTRAL)
        validation.temperature(self.temperature, "temperature", allow_zero=True)
        validation.top_p(self.top_p, "top_p")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise RequestError(f"seed = {self.seed}: must fit 64 bits", field="seed")
        vocab, max_len = backend.vocab_size, backend.max_seq_len
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(self, name) or 0) > vocab:
                raise RequestError(f"{name} = {getattr(self, name)}: at most {vocab}", field=name)
        for i, prompt in enumerate(prompts):
            if len(prompt.ids) + self.new_tokens > max_len:
                raise RequestError(
                    f"max_tokens = {self.new_tokens} + prompt {i}'s {len(prompt.ids)} tokens "
                    f"exceed max_model_len = {max_len}",
                    field="max_tokens",
                )

    def drawn_seed(self) -> int:
        """The request's seed, or a fresh one (vLLM samples anew for each unseeded request)."""
        return secrets.randbits(64) if self.seed is None else self.seed % 2**64

    def choice_seeds(self) -> list[int]:
        """Choice j's seed: (s + j) mod 2**64, so choice j is what n = 1 with that seed gives."""
        seed = self.drawn_seed()
        return [(seed + j) % 2**64 for j in range(self.n)]

    def to_generate_request(self, prompts: list[Tokenized], seed: int) -> GenerateRequest:
        return GenerateRequest(
            [Prompt(prompt.ids, prompt.path) for prompt in prompts],
            max_new_tokens=self.new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=seed,
            ignore_eos=self.ignore_eos,
            names=self._names,
        )

    def to_score_request(
        self, sequences: list[Sequence], top_k: int, sample_next: SamplingOptions | None
    ) -> ScoreRequest:
        """Log-probs at the request's temperature (greedy, 0, is scored at 1), with ranks."""
        return ScoreRequest(
            sequences,
            top_k=top_k,
            temperature=self.temperature or 1.0,
            ranks=True,
            sample_next=sample_next,
            names=self._names,
        )


def check_model(model: str | None, backend: Backend) -> None:
    """vLLM checks the model first: an unknown one is 404 whatever else is wrong."""
    if model is not None and model != backend.model_id:
        raise ModelNotFound(model)


def refuse_non_neutral(body: BaseModel, neutral: dict[str, tuple[Any, ...]]) -> None:
    """Fields taken only at the value that changes nothing: none is silently ignored."""
    for name, allowed in neutral.items():
        value = getattr(body, name)
        if value is not None and value not in allowed:
            raise RequestError(f"{name} = {value!r}: only {allowed[0]!r} is supported", field=name)


def _describe(problems: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The first problem, its field as OpenAI's `param` (`prompt[1][1]`)."""
    first = problems[0]
    loc, message = first["loc"], first["msg"]
    param = "".join([*map(str, loc[:1]), *(f"[{p}]" for p in loc[1:] if isinstance(p, int))])
    if first["type"] == "extra_forbidden":
        message = "unknown field (not part of the completions API served here)"
    elif loc[:1] == ("prompt",):
        message = "expected a string, a list of strings, token ids (>= 0) or lists of them"
    return f"{param or 'body'}: {message}", param or None


class Finished(NamedTuple):
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    stop_reason: str | None  # the stop string, as vLLM reports it


def fusable(
    body: CompletionBody, prompts: list[Tokenized], top_k: int | None, engine: Engine
) -> bool:
    """One token after prompts that are scored anyway (TRL's get_sequence_logprobs): the
    token is sampled from the scoring forward's last row instead of a second forward."""
    return (
        body.new_tokens == 1
        and body.logprobs is None
        and top_k is not None
        and all(len(prompt.ids) > 1 for prompt in prompts)
        and engine.backend.samples_while_scoring
    )


async def generate(
    body: CompletionBody, prompts: list[Tokenized], engine: Engine, seed: int
) -> list[Completion]:
    if body.new_tokens == 0:
        return [Completion([], "length") for _ in prompts]
    return await engine.generate(body.to_generate_request(prompts, seed))


async def score(
    body: CompletionBody,
    prompts: list[Tokenized],
    sequences: list[list[int]],
    first: int | list[int],
    top_k: int | None,
    engine: Engine,
    sample_next: SamplingOptions | None = None,
) -> list[SequenceScores | None]:
    """One engine call for all sequences (sequence i holds prompt i), scored from `first`
    on, so they batch together; None where nothing is asked or there is nothing to score.
    `sample_next` also samples the token after each sequence in the same forward pass."""
    froms = [first] * len(sequences) if isinstance(first, int) else first
    index = [n for n, ids in enumerate(sequences) if froms[n] < len(ids)]
    results: list[SequenceScores | None] = [None] * len(sequences)
    if top_k is None or not index:
        return results
    scored = [Sequence(sequences[n], froms[n], path=prompts[n].path) for n in index]
    answers = await engine.score(body.to_score_request(scored, top_k, sample_next))
    for n, result in zip(index, answers, strict=True):
        results[n] = result
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


def wire(logprob: float) -> float:
    """A log-prob as JSON can carry it: -inf (and NaN) as vLLM's -9999.0."""
    return logprob if logprob > MIN_LOGPROB else MIN_LOGPROB


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
        return {"logprob": wire(logprob), "rank": rank, "decoded_token": decoded(token)}

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


class Choice(NamedTuple):
    """One draw for every prompt: what a request with n = 1 and this seed computes."""

    finished: list[Finished]  # per prompt
    sequences: list[list[int]]  # prompt i (+ its completion when that was scored)
    scores: list[SequenceScores | None]


async def complete(body: CompletionBody, engine: Engine) -> bytes:
    """Validate, then draw the n choices, then render the JSON off the event loop (a large
    top-k response is seconds of Python that would stall every other client)."""
    body.check_model(engine.backend)
    prompts = body.tokenized(engine.backend)
    body.check(prompts, engine.backend, engine.config.limits)
    draws = await draw_choices(body, prompts, engine)
    return await asyncio.to_thread(render, body, engine, prompts, draws, body.prompt_k)


async def draw_choices(
    body: CompletionBody, prompts: list[Tokenized], engine: Engine
) -> list[Choice]:
    """The n choices of a checked body, each drawn as its own n = 1 request would be, all
    at once (the chat dialect's too)."""
    prompt_k = body.prompt_k
    top_k = max((k for k in (prompt_k, body.logprobs) if k is not None), default=None)
    outcomes = await asyncio.gather(
        *(draw(body, prompts, prompt_k, top_k, engine, seed) for seed in body.choice_seeds()),
        return_exceptions=True,  # wait for all, then raise the first failure
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes


async def draw(
    body: CompletionBody,
    prompts: list[Tokenized],
    prompt_k: int | None,
    top_k: int | None,
    engine: Engine,
    seed: int,
) -> Choice:
    """Sample and score one choice per prompt, from `seed` (the n = 1 request's work)."""
    ids_list = [prompt.ids for prompt in prompts]

    def decode(ids: list[int]) -> str:
        return engine.backend.tokenizer.decode(ids, skip_special_tokens=True)

    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if body.logprobs is not None and body.new_tokens > 0:  # the completion's log-probs: after it
        sampled = await generate(body, prompts, engine, seed)
        finished = [finish(c, stops, decode) for c in sampled]
        sequences = [ids + f.token_ids for ids, f in zip(ids_list, finished)]
        first = 1 if prompt_k is not None else [len(ids) for ids in ids_list]
        scores = await score(body, prompts, sequences, first, top_k, engine)
        return Choice(finished, sequences, scores)
    if fusable(body, prompts, top_k, engine):  # TRL's request: one forward
        options = SamplingOptions(
            1,
            1.0 if body.temperature is None else body.temperature,
            1.0 if body.top_p is None else body.top_p,
            seed,
        )
        scores = await score(body, prompts, ids_list, 1, top_k, engine, sample_next=options)
        eos = set() if body.ignore_eos else engine.backend.eos_ids
        sampled = [
            Completion([s.next_token_id], "eos" if s.next_token_id in eos else "length")
            for s in scores
        ]
        return Choice([finish(c, stops, decode) for c in sampled], ids_list, scores)
    # the prompts' log-probs need not wait for sampling: both at once
    both = await asyncio.gather(
        generate(body, prompts, engine, seed),
        score(body, prompts, ids_list, 1, top_k, engine),
        return_exceptions=True,  # wait for both, then raise the first failure
    )
    for outcome in both:
        if isinstance(outcome, BaseException):
            raise outcome
    return Choice([finish(c, stops, decode) for c in both[0]], ids_list, both[1])


def render(
    body: CompletionBody,
    engine: Engine,
    prompts: list[Tokenized],
    draws: list[Choice],
    prompt_k: int | None,
) -> bytes:
    """The text_completion object: prompt i's choice j (of draws[j]) has index i * n + j."""
    tokenizer = engine.backend.tokenizer
    decoded = functools.lru_cache(maxsize=None)(lambda token: tokenizer.decode([token]))
    name = (lambda token: f"token_id:{token}") if body.return_tokens_as_token_ids else decoded
    choices = []
    for i, (ids, text, _) in enumerate(prompts):
        prompt_text = text if text is not None else tokenizer.decode(ids)
        for choice in draws:
            done, sequence, scores = choice.finished[i], choice.sequences[i], choice.scores[i]
            legacy = prompt_logprobs = None
            if body.logprobs is not None:
                positions = position_dicts(scores, sequence, body.logprobs, decoded)
                start = 0 if body.echo else len(ids)
                legacy = legacy_logprobs(sequence[start:], positions[start:], name)
            if prompt_k is not None:
                positions = position_dicts(scores, sequence, prompt_k, decoded)
                prompt_logprobs = positions[: len(ids)]
            choices.append(
                {
                    "index": len(choices),
                    "text": prompt_text + done.text if body.echo else done.text,
                    "logprobs": legacy,
                    "finish_reason": done.finish_reason,
                    "stop_reason": done.stop_reason,
                    "token_ids": done.token_ids if body.return_token_ids else None,
                    "prompt_logprobs": prompt_logprobs,
                    "prompt_token_ids": ids if body.return_token_ids else None,
                }
            )
    # vLLM's usage: each prompt once, every choice's completion
    prompt_tokens = sum(len(prompt.ids) for prompt in prompts)
    completion_tokens = sum(len(f.token_ids) for choice in draws for f in choice.finished)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    usage["total_tokens"] = prompt_tokens + completion_tokens
    response = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion"}
    response |= {"created": int(time.time()), "model": engine.backend.model_id}
    response |= {"choices": choices, "usage": usage}
    return json.dumps(response, ensure_ascii=False, allow_nan=False).encode()


# --- the router ----------------------------------------------------------------------------


_SCHEMA = {"application/json": {"schema": CompletionBody.model_json_schema()}}


@router.post("/v1/completions", openapi_extra={"requestBody": {"content": _SCHEMA}})
async def completions(request: Request) -> Response:
    """Completions with the teacher's log-probs (vLLM's `prompt_logprobs` included)."""
    try:
        body = await read_body(request, CompletionBody, _describe)
        content = await complete(body, request.app.state.engine)
    except Exception as error:
        return error_response(error)
    return Response(content, media_type="application/json")


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """The served model, as vLLM lists it (TRL's VLLMClient reads data[0].id)."""
    backend = request.app.state.engine.backend
    card = {"id": backend.model_id, "object": "model", "created": STARTED}
    card |= {"owned_by": "teacher-service", "root": backend.model_id, "parent": None}
    return {"object": "list", "data": [{**card, "max_model_len": backend.max_seq_len}]}
