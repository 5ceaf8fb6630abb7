"""The native API: the gRPC calls over HTTP, in JSON or msgpack.

Bodies mirror the proto messages field for field (protos/teacher.proto), and go through
the same validation, so an error names the same field as over gRPC. Content-Type picks
the request's encoding and Accept the response's (`application/msgpack`, else JSON). In
msgpack a tensor is {"dtype", "shape", "data": raw little-endian bytes}; in JSON it is a
nested list (bfloat16 values as float32, exactly).

Laid out as vLLM's entrypoints are: the bodies with their `to_...()` conversions into the
engine's requests, the serving functions (engine results -> response content), the router.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgpack
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from teacher_client.codec import CodecError, dtype_enum
from teacher_client.messages import info_to_proto
from teacher_client.proto import teacher_pb2 as pb
from teacher_service.codec import decode_ids, encode_torch
from teacher_service.engine import Engine
from teacher_service.errors import RequestError
from teacher_service.frontends.http.body import BodyError, SchemaError, read_body
from teacher_service.frontends.http.errors import error_headers, http_error
from teacher_service.requests import GenerateRequest, Prompt, ScoreRequest, Sequence
from teacher_service.scoring import SequenceScores

MSGPACK = "application/msgpack"
router = APIRouter(prefix="/v1", tags=["native"])


Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]  # the proto's int32 fields


# --- the bodies and their conversions ----------------------------------------------------


class TensorBody(BaseModel):
    """A tensor in msgpack: raw little-endian bytes with a dtype and a shape."""

    model_config = ConfigDict(extra="forbid")
    dtype: str
    shape: list[int]
    data: bytes


class SequenceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token_ids: list[Int32]
    score_from: Int32 = Field(description="first scored position (>= 1)")
    candidate_ids: list[Int32] | list[list[Int32]] | TensorBody | None = Field(
        None, description="token ids to score at every position: [m], [T, m] or a tensor"
    )

    def to_sequence(self, field: str) -> Sequence:
        """`field`: this sequence's path, for the candidate ids' errors."""
        candidates = None
        if self.candidate_ids is not None:
            candidates = _ids_array(self.candidate_ids, f"{field}.candidate_ids")
        return Sequence(self.token_ids, self.score_from, candidates)


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sequences: list[SequenceBody]
    top_k: Int32 = 0
    full: bool = False
    temperature: float | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    request_id: str = ""

    def to_score_request(self) -> ScoreRequest:
        return ScoreRequest(
            [s.to_sequence(f"sequences[{n}]") for n, s in enumerate(self.sequences)],
            top_k=self.top_k,
            full=self.full,
            temperature=self.temperature,
            dtype=self.dtype,
        )


class PromptBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token_ids: list[Int32]


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[PromptBody]
    max_new_tokens: Int32 = 64
    temperature: float | None = None
    top_p: float | None = None
    seed: Annotated[int, Field(ge=0, le=2**64 - 1)] | None = None
    ignore_eos: bool = False
    request_id: str = ""

    def to_generate_request(self) -> GenerateRequest:
        return GenerateRequest(
            [Prompt(p.token_ids) for p in self.prompts],
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


def _ids_array(value: Any, field: str) -> np.ndarray:
    """Candidate ids as a list [m], a list of lists [T, m], or a msgpack tensor."""
    if isinstance(value, TensorBody):
        try:
            dtype = dtype_enum(value.dtype)
        except CodecError as error:
            raise BodyError(f"{field}.dtype: {error}") from None
        for n, size in enumerate(value.shape):
            if not 0 <= size < 2**63:  # the proto's int64, so that the error names the field
                raise RequestError(
                    f"{field}.shape[{n}] = {size}: a dimension must be in [0, 2**63)",
                    field=f"{field}.shape[{n}]",
                )
        return decode_ids(pb.Tensor(dtype=dtype, shape=value.shape, data=value.data), field)
    try:
        array = np.asarray(value)
        fits = array.dtype.kind in "iu" and array.ndim in (1, 2)
    except ValueError:  # ragged rows
        fits = False
    if not fits:
        raise BodyError(f"{field}: expected a list [m] or a list of lists [T, m] of token ids")
    return array.astype(np.int64)


def _describe(problems: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The first problem as one readable line naming the field (FastAPI's `detail` too)."""
    first = problems[0] if problems else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    return f"{where or 'body'}: {first.get('msg', '')}", where or None


# --- serving: engine results -> response content -----------------------------------------


def _tensor_out(tensor, packed: bool) -> Any:
    if packed:
        wire = encode_torch(tensor)
        return {
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(wire.shape),
            "data": wire.data,
        }
    return tensor.float().tolist() if tensor.is_floating_point() else tensor.tolist()


def scores_out(scores: SequenceScores, packed: bool) -> dict[str, Any]:
    out = {}
    for name in (
        "target_logprobs",
        "topk_ids",
        "topk_logprobs",
        "candidate_logprobs",
        "full_logprobs",
    ):
        tensor = getattr(scores, name)
        if tensor is not None:
            out[name] = _tensor_out(tensor, packed)
    return out


async def serve_score(engine: Engine, body: ScoreBody, packed: bool) -> dict[str, Any]:
    results = await engine.score(body.to_score_request())
    return {"request_id": body.request_id, "results": [scores_out(r, packed) for r in results]}


async def serve_generate(engine: Engine, body: GenerateBody) -> dict[str, Any]:
    completions = await engine.generate(body.to_generate_request())
    return {
        "request_id": body.request_id,
        "completions": [
            {"token_ids": c.token_ids, "finish_reason": c.finish_reason} for c in completions
        ],
    }


def serve_info(engine: Engine) -> dict[str, Any]:
    """InfoResponse's fields as the proto has them (-1 for a missing token id)."""
    message = info_to_proto(engine.info())
    return {
        field.name: list(value) if field.is_repeated else value
        for field in message.DESCRIPTOR.fields
        for value in [getattr(message, field.name)]
    }


# --- the router ----------------------------------------------------------------------------


def respond(content: dict[str, Any], packed: bool) -> Response:
    if packed:
        return Response(msgpack.packb(content, use_bin_type=True), media_type=MSGPACK)
    return JSONResponse(content)


def wants_msgpack(request: Request) -> bool:
    return "msgpack" in request.headers.get("accept", "")


def error_response(error: Exception) -> JSONResponse:
    """{"error": message}; a schema error also carries pydantic's `detail`, as FastAPI's."""
    status, message, _, _ = http_error(error)
    content: dict[str, Any] = {"error": message}
    if isinstance(error, SchemaError):
        content = {"detail": error.problems, **content}
    return JSONResponse(status_code=status, content=content, headers=error_headers(error))


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body read by hand: its JSON schema, or msgpack bytes."""
    schema = model.model_json_schema(ref_template="#/$defs/{model}")
    content = {
        "application/json": {"schema": schema},
        MSGPACK: {"schema": {"type": "string", "format": "binary"}},
    }
    return {"requestBody": {"content": content, "required": True}}


@router.post("/score", openapi_extra=_body_doc(ScoreBody))
async def score(request: Request) -> Response:
    """The teacher's log-probs for each sequence from `score_from` on (gRPC `Score`)."""
    packed = wants_msgpack(request)
    try:
        body = await read_body(request, ScoreBody, _describe, msgpack_ok=True)
        content = await serve_score(request.app.state.engine, body, packed)
    except Exception as error:
        return error_response(error)
    return respond(content, packed)


@router.post("/generate", openapi_extra=_body_doc(GenerateBody))
async def generate(request: Request) -> Response:
    """Sample completions of token-id prompts (gRPC `Generate`)."""
    try:
        body = await read_body(request, GenerateBody, _describe, msgpack_ok=True)
        content = await serve_generate(request.app.state.engine, body)
    except Exception as error:
        return error_response(error)
    return respond(content, wants_msgpack(request))


@router.get("/info")
async def info(request: Request) -> Response:
    """Model, vocabulary, tokenizer fingerprint, limits and capabilities (gRPC `Info`)."""
    return respond(serve_info(request.app.state.engine), wants_msgpack(request))
