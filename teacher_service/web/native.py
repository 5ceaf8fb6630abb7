"""The native API: the gRPC calls over HTTP, in JSON or msgpack.

Bodies mirror the proto messages field for field (protos/teacher.proto), and go through
the same validation, so an error names the same field as over gRPC. Content-Type picks
the request's encoding and Accept the response's (`application/msgpack`, else JSON). In
msgpack a tensor is {"dtype", "shape", "data": raw little-endian bytes}; in JSON it is a
nested list (bfloat16 values as float32, exactly).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgpack
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from teacher_client.codec import CodecError, dtype_enum, encode_numpy
from teacher_client.proto import teacher_pb2 as pb
from teacher_service.codec import encode_torch
from teacher_service.scoring import SequenceScores
from teacher_service.web.app import BodyError, http_status

MSGPACK = "application/msgpack"
router = APIRouter(prefix="/v1", tags=["native"])


Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]  # the proto's int32 fields


class BodyTooLarge(BodyError):
    """A body over max_message_bytes (HTTP 413)."""


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


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sequences: list[SequenceBody]
    top_k: Int32 = 0
    full: bool = False
    temperature: float | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    request_id: str = ""


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


async def read_body(request: Request, model: type[BaseModel]) -> Any:
    """Decode by Content-Type (msgpack or JSON) and check against the schema (422)."""
    raw = await request.body()
    limit = request.app.state.engine.config.limits.max_message_bytes
    if len(raw) > limit:
        raise BodyTooLarge(
            f"the request body has {len(raw)} bytes, over max_message_bytes = {limit}"
        )
    content_type = request.headers.get("content-type", "")
    try:
        if "msgpack" in content_type:
            decoded = msgpack.unpackb(raw, raw=False)
        else:
            decoded = json.loads(raw or b"null")
    except (ValueError, msgpack.UnpackException) as error:
        kind = "msgpack" if "msgpack" in content_type else "JSON"
        raise BodyError(f"the body is not valid {kind}: {error}") from None
    try:
        return model.model_validate(decoded)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


def error_response(error: Exception) -> JSONResponse:
    status, message = (413, str(error)) if isinstance(error, BodyTooLarge) else http_status(error)
    return JSONResponse(status_code=status, content={"error": message})


def _ids_tensor(value: Any, field: str) -> pb.Tensor:
    import numpy as np

    if isinstance(value, TensorBody):
        try:
            return pb.Tensor(dtype=dtype_enum(value.dtype), shape=value.shape, data=value.data)
        except CodecError as error:
            raise BodyError(f"{field}.dtype: {error}") from None
    array = np.asarray(value)
    if array.dtype.kind not in "iu" or array.ndim not in (1, 2):
        raise BodyError(f"{field}: expected a list [m] or a list of lists [T, m] of token ids")
    return encode_numpy(array.astype(np.int64), "int64")


def to_score_request(body: ScoreBody) -> pb.ScoreRequest:
    request = pb.ScoreRequest(
        top_k=body.top_k, full=body.full, dtype=dtype_enum(body.dtype), request_id=body.request_id
    )
    if body.temperature is not None:
        request.temperature = body.temperature
    for n, sequence in enumerate(body.sequences):
        message = request.sequences.add(
            token_ids=sequence.token_ids, score_from=sequence.score_from
        )
        if sequence.candidate_ids is not None:
            tensor = _ids_tensor(sequence.candidate_ids, f"sequences[{n}].candidate_ids")
            message.candidate_ids.CopyFrom(tensor)
    return request


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


def respond(request: Request, content: dict[str, Any], packed: bool) -> Response:
    if packed:
        return Response(msgpack.packb(content, use_bin_type=True), media_type=MSGPACK)
    return JSONResponse(content)


def wants_msgpack(request: Request) -> bool:
    return "msgpack" in request.headers.get("accept", "")


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
    try:
        body = await read_body(request, ScoreBody)
        results = await request.app.state.engine.score(to_score_request(body))
    except RequestValidationError:
        raise
    except Exception as error:
        return error_response(error)
    packed = wants_msgpack(request)
    content = {"request_id": body.request_id, "results": [scores_out(r, packed) for r in results]}
    return respond(request, content, packed)


@router.post("/generate", openapi_extra=_body_doc(GenerateBody))
async def generate(request: Request) -> Response:
    """Sample completions of token-id prompts (gRPC `Generate`)."""
    try:
        body = await read_body(request, GenerateBody)
        message = pb.GenerateRequest(
            prompts=[pb.Prompt(token_ids=p.token_ids) for p in body.prompts],
            max_new_tokens=body.max_new_tokens,
            ignore_eos=body.ignore_eos,
            request_id=body.request_id,
        )
        for name in ("temperature", "top_p", "seed"):
            if getattr(body, name) is not None:
                setattr(message, name, getattr(body, name))
        completions = await request.app.state.engine.generate(message)
    except RequestValidationError:
        raise
    except Exception as error:
        return error_response(error)
    content = {
        "request_id": body.request_id,
        "completions": [
            {"token_ids": c.token_ids, "finish_reason": c.finish_reason} for c in completions
        ],
    }
    return respond(request, content, wants_msgpack(request))


@router.get("/info")
async def info(request: Request) -> Response:
    """Model, vocabulary, tokenizer fingerprint, limits and capabilities (gRPC `Info`)."""
    message = request.app.state.engine.info()
    content = {
        field.name: list(value) if field.is_repeated else value
        for field in message.DESCRIPTOR.fields
        for value in [getattr(message, field.name)]
    }
    return respond(request, content, wants_msgpack(request))
