"""The Hugging Face TGI (text-generation-inference) dialect: POST / and /generate, GET /info.

Shaped after TGI 2.x (router/src/lib.rs, router/src/server.rs, docs/openapi.json) so that
Hugging Face's `text-generation` client works unchanged: `/` answers a one-element list
(the api-inference shape the client parses as `payload[0]`), `/generate` one object, and
errors are {"error", "error_type"}. Text in, text out: `inputs` is encoded with the
teacher's tokenizer with its special tokens (TGI adds them, e.g. Llama's BOS), generated
by the shared engine, and every log-prob comes from the engine's scoring path, so it is the
number gRPC `Score` returns for the same ids.

Log-probs follow TGI's server (text_generation_server): `prefill` holds the raw model's
log p(token_i | tokens < i), temperature 1 always (TGI log-softmaxes the raw prefill
logits), the first token null; `tokens` and `top_tokens` are of softmax(logits / T), T the
request's temperature when it samples, as TGI computes them after its temperature warper.
One deliberate difference: TGI also renormalises them over the top_p nucleus; here they
stay over the whole vocabulary, because a teacher's log-prob is meant to be its own
distribution, not a truncated one.

Not offered (422 naming the field): streaming, best_of > 1, watermark, grammar, adapters,
typical_p / top_k, penalties other than neutral ones. Unknown fields are refused (TGI
ignores them) so a typo never passes silently. Stop sequences cut the completion after
generation: the engine generates up to max_new_tokens, then the first stop string ends it.

Laid out as vLLM's entrypoints are: the body with its conversion into the engine's
request, the serving function (validate, generate, cut, score), the router.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from teacher_service import __version__
from teacher_service.engine import Engine
from teacher_service.errors import ErrorKind, RequestError
from teacher_service.frontends.http.body import read_body
from teacher_service.frontends.http.errors import error_headers, http_error
from teacher_service.requests import GenerateRequest, Names, Prompt, ScoreRequest, Sequence

router = APIRouter(tags=["tgi"])

DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default when `max_new_tokens` is absent
NULL_MAX_NEW_TOKENS_CAP = 1024  # TGI: null means "up to max_total_tokens", at most this
MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences
# the engine's errors name the prompt `inputs`, as TGI's do
NAMES = Names(sequences="inputs", token_ids="", score_from="", candidate_ids="")


class Parameters(BaseModel):
    """TGI's GenerateParameters, strict like its serde types (no "1" for 1)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    best_of: int | None = Field(None, gt=0)
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = Field(DEFAULT_MAX_NEW_TOKENS, ge=0)
    return_full_text: bool | None = None
    stop: list[str] = []
    truncate: int | None = Field(None, ge=0)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    top_n_tokens: int | None = Field(None, ge=0)
    grammar: Any = None
    adapter_id: str | None = None

    @property
    def samples(self) -> bool:
        """TGI samples when asked to or when a warper is on (temperature != 1, top_p)."""
        return self.do_sample or self.temperature not in (None, 1.0) or self.top_p is not None

    @property
    def scoring_temperature(self) -> float:
        """The temperature the generated tokens' log-probs are of (1 when greedy)."""
        return self.temperature if self.samples and self.temperature is not None else 1.0

    def to_generate_request(
        self, ids: list[int], max_new_tokens: int, seed: int | None
    ) -> GenerateRequest:
        return GenerateRequest(
            [Prompt(ids, path="inputs")],
            max_new_tokens=max_new_tokens,
            temperature=self.scoring_temperature if self.samples else 0.0,
            top_p=self.top_p,
            seed=seed or 0,
            names=NAMES,
        )


class GenerateBody(BaseModel):
    """TGI's CompatGenerateRequest (`/generate` takes the same, `stream` false)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    inputs: str
    parameters: Parameters | None = None
    stream: bool = False


def _describe(problems: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Every schema problem, as TGI lists them; the field is the first one's."""
    paths = [".".join(str(part) for part in e["loc"]) for e in problems]
    message = "; ".join(f"`{path or 'body'}`: {e['msg']}" for path, e in zip(paths, problems))
    return message, (paths[0] or None) if paths else None


def token_limits(engine: Engine) -> tuple[int, int]:
    """(max_input_tokens, max_total_tokens): the model's context and one forward pass."""
    limits = engine.config.limits
    total = min(engine.backend.max_seq_len, limits.max_batch_tokens, limits.max_tokens_per_request)
    return total - 1, total


def check_supported(body: GenerateBody, p: Parameters) -> None:
    """Refuse what TGI would do and this service does not, instead of ignoring it."""
    if body.stream:
        raise RequestError(
            "`stream`: true is not supported (no server-sent events here)", field="stream"
        )
    if not body.inputs:
        raise RequestError("`inputs` cannot be empty", field="inputs")
    refused = {
        "watermark": p.watermark,
        "grammar": p.grammar is not None,
        "adapter_id": p.adapter_id is not None,
        "typical_p": p.typical_p is not None,
        "top_k": p.top_k is not None,
        "repetition_penalty": p.repetition_penalty not in (None, 1.0),
        "frequency_penalty": p.frequency_penalty not in (None, 0.0),
    }
    for name, bad in refused.items():
        if bad:
            raise RequestError(
                f"`{name}` is not supported by this teacher service (leave it null)", field=name
            )
    if p.best_of not in (None, 1):
        raise RequestError("`best_of` != 1 is not allowed for this endpoint", field="best_of")
    if p.temperature is not None and p.temperature <= 0:
        raise RequestError("`temperature` must be strictly positive", field="temperature")
    if p.top_p is not None and not 0 < p.top_p < 1:
        raise RequestError("`top_p` must be > 0.0 and < 1.0", field="top_p")
    if p.max_new_tokens == 0:
        raise RequestError("`max_new_tokens` must be strictly positive", field="max_new_tokens")
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise RequestError(
            f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(p.stop)}",
            field="stop",
        )
    if "" in p.stop:
        raise RequestError("`stop` holds an empty string, which would stop at once", field="stop")


def encode(engine: Engine, body: GenerateBody, p: Parameters) -> tuple[list[int], int]:
    """Input ids (special tokens added, left-truncated to `truncate`) and max_new_tokens."""
    max_input, max_total = token_limits(engine)
    if p.truncate is not None and not 0 < p.truncate <= max_input:
        raise RequestError(
            f"`truncate` must be strictly positive and less than {max_input}. Given: {p.truncate}",
            field="truncate",
        )
    ids = list(engine.backend.tokenizer(body.inputs, add_special_tokens=True)["input_ids"])
    if p.truncate is not None:
        ids = ids[-p.truncate :]
    if len(ids) > max_input:
        raise RequestError(
            f"`inputs` must have less than {max_input} tokens. Given: {len(ids)}", field="inputs"
        )
    wanted = p.max_new_tokens
    if wanted is None:
        wanted = min(max_total - len(ids), NULL_MAX_NEW_TOKENS_CAP)
    if len(ids) + wanted > max_total:
        raise RequestError(
            f"`inputs` tokens + `max_new_tokens` must be <= {max_total}. "
            f"Given: {len(ids)} `inputs` tokens and {wanted} `max_new_tokens`",
            field="max_new_tokens",
        )
    top_n, vocab = p.top_n_tokens or 0, engine.backend.vocab_size
    if top_n > vocab:
        raise RequestError(
            f"`top_n_tokens` must be >= 0 and <= {vocab}. Given: {top_n}", field="top_n_tokens"
        )
    return ids, wanted


def finish(
    engine: Engine, ids: list[int], completion: list[int], max_new: int, stops: list[str]
) -> tuple[list[int], list[str], str]:
    """Kept tokens, their texts and TGI's finish_reason, checked in TGI's order per token
    (length, then eos, then stop strings). Texts are TGI's incremental decoding (a few
    tokens of context; "" while a multi-byte character is incomplete), and a stop string
    counts once it appears anywhere in the text so far (TGI: at its end)."""
    tokenizer, eos = engine.backend.tokenizer, engine.backend.eos_ids
    all_ids = ids + completion
    prefix_at, read_at = max(len(ids) - 5, 0), len(ids)
    longest_stop = max((len(stop) for stop in stops), default=0)
    texts: list[str] = []
    output = ""
    for n, token in enumerate(completion):
        end = len(ids) + n + 1
        before = tokenizer.decode(all_ids[prefix_at:read_at], skip_special_tokens=False)
        after = tokenizer.decode(all_ids[prefix_at:end], skip_special_tokens=False)
        piece = ""
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece, prefix_at, read_at = after[len(before) :], read_at, end
        texts.append(piece)
        output += piece
        reason = None
        if n + 1 >= max_new:
            reason = "length"
        elif token in eos:
            reason = "eos_token"
        elif any(stop in output[-(len(piece) + longest_stop) :] for stop in stops):
            reason = "stop_sequence"
        if reason is not None:
            return completion[: n + 1], texts, reason
    return completion, texts, "length"


def decode_after(tokenizer: Any, context: list[int], new: list[int]) -> str:
    """The text of `new` decoded after `context` (so SentencePiece keeps a leading space)."""
    prefix = tokenizer.decode(context, skip_special_tokens=True)
    full = tokenizer.decode(context + new, skip_special_tokens=True)
    return full[len(prefix) :] if full.startswith(prefix) else tokenizer.decode(new)


def score_request(ids: list[int], score_from: int, temperature: float, top_k: int) -> ScoreRequest:
    return ScoreRequest(
        [Sequence(ids, score_from, path="inputs")],
        top_k=top_k,
        temperature=temperature,
        names=NAMES,
    )


async def details(
    engine: Engine, ids: list[int], kept: list[int], texts: list[str], p: Parameters, t: float
) -> dict[str, Any]:
    """TGI's Details: the kept tokens scored at temperature t (with the top n), and the
    input scored at temperature 1 when decoder_input_details asks for the prefill."""
    tokenizer, top_n = engine.backend.tokenizer, p.top_n_tokens or 0
    special = set(tokenizer.all_special_ids)
    jobs = [engine.score(score_request(ids + kept, len(ids), t, top_n))]
    if p.decoder_input_details and len(ids) > 1:
        jobs.append(engine.score(score_request(ids, 1, 1.0, 0)))
    scored = [results[0] for results in await asyncio.gather(*jobs)]

    def token(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        return {"id": token_id, "text": text, "logprob": logprob, "special": token_id in special}

    out: dict[str, Any] = {"prefill": []}
    if p.decoder_input_details:
        logprobs = [None] + (scored[1].target_logprobs.tolist() if len(ids) > 1 else [])
        out["prefill"] = [
            {"id": i, "text": tokenizer.decode([i], skip_special_tokens=False), "logprob": lp}
            for i, lp in zip(ids, logprobs)
        ]
    out["tokens"] = [
        {"id": i, "text": text, "logprob": lp, "special": i in special}
        for i, text, lp in zip(kept, texts, scored[0].target_logprobs.tolist())
    ]
    if top_n:
        rows = zip(scored[0].topk_ids.tolist(), scored[0].topk_logprobs.tolist())
        out["top_tokens"] = [[token(i, lp) for i, lp in zip(*row)] for row in rows]
    return out


async def serve_generate(
    engine: Engine, body: GenerateBody
) -> tuple[dict[str, Any], dict[str, str]]:
    """One TGI generation: validate, generate, cut at stop strings, score if details."""
    p = body.parameters or Parameters()
    check_supported(body, p)
    ids, max_new = encode(engine, body, p)
    seed = (p.seed if p.seed is not None else secrets.randbits(64)) if p.samples else None
    (completion,) = await engine.generate(p.to_generate_request(ids, max_new, seed))
    kept, texts, reason = finish(engine, ids, completion.token_ids, max_new, p.stop)
    text = decode_after(engine.backend.tokenizer, ids[-1:], kept)
    content: dict[str, Any] = {"generated_text": body.inputs + text if p.return_full_text else text}
    if p.details or p.decoder_input_details:
        content["details"] = {
            "finish_reason": reason,
            "generated_tokens": len(kept),
            "seed": seed,
            **await details(engine, ids, kept, texts, p, p.scoring_temperature),
        }
    headers = {"x-prompt-tokens": str(len(ids)), "x-generated-tokens": str(len(kept))}
    return content, headers


# the body is read by hand (TGI's error shape), so its schema is given to OpenAPI here
_BODY_DOC = {
    "requestBody": {
        "content": {
            "application/json": {
                "schema": GenerateBody.model_json_schema(ref_template="#/$defs/{model}")
            }
        },
        "required": True,
    }
}


def error_response(error: Exception) -> JSONResponse:
    """TGI's ErrorResponse; error_type lets the client raise ValidationError etc."""
    status, message, _, kind = http_error(error)
    if kind is ErrorKind.OVERLOADED:
        error_type = "overloaded"
    else:
        error_type = "validation" if status < 500 else "generation"
    content = {"error": message, "error_type": error_type}
    return JSONResponse(status_code=status, content=content, headers=error_headers(error))


async def generate_text(request: Request) -> tuple[dict[str, Any], dict[str, str]]:
    body = await read_body(request, GenerateBody, _describe)
    return await serve_generate(request.app.state.engine, body)


@router.post("/", openapi_extra=_BODY_DOC)
async def compat_generate(request: Request) -> JSONResponse:
    """TGI's `/`: the generation wrapped in a one-element list (`stream` must be false)."""
    try:
        content, headers = await generate_text(request)
    except Exception as error:
        return error_response(error)
    return JSONResponse([content], headers=headers)


@router.post("/generate", openapi_extra=_BODY_DOC)
async def generate(request: Request) -> JSONResponse:
    """TGI's `/generate`: one GenerateResponse {generated_text, details?}."""
    try:
        content, headers = await generate_text(request)
    except Exception as error:
        return error_response(error)
    return JSONResponse(content, headers=headers)


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    """TGI's Info (the 2.x fields, plus the 1.x names older readers look for)."""
    engine: Engine = request.app.state.engine
    served, limits = engine.info(), engine.config.limits
    max_input, max_total = token_limits(engine)
    return {
        "model_id": served.model_id,
        "model_sha": None,
        "model_dtype": f"torch.{served.model_dtype}",
        "model_device_type": served.device.split(":")[0],
        "model_pipeline_tag": "text-generation",
        # requests of the largest size that the queue admits before answering 429
        "max_concurrent_requests": max(1, limits.max_queued_tokens // max_total),
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_input_tokens": max_input,
        "max_input_length": max_input,
        "max_total_tokens": max_total,
        "max_batch_total_tokens": limits.max_batch_tokens,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "router": "teacher-service",
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }
