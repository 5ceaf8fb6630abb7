"""Request validation: wire messages -> checked work items, or an error naming the field.

Runs before anything is queued, so a bad request never reaches a batch and never affects
anyone else's. Front-end neutral: the gRPC servicer maps RequestError to a status code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from teacher_client.codec import LOGPROB_DTYPES, CodecError, decode_numpy, dtype_name
from teacher_client.proto import teacher_pb2 as pb
from teacher_service.backend import ScoreItem
from teacher_service.codec import torch_dtype
from teacher_service.config import Limits
from teacher_service.sampling import SamplingOptions
from teacher_service.scoring import ScoreOptions


class RequestError(ValueError):
    """A request the service will not run. `too_large` ones break a configured limit."""

    caused_by_request = True  # the batcher logs it without a traceback

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class ModelLimits:
    """What the loaded model accepts, next to the configured request limits."""

    vocab_size: int
    max_seq_len: int
    limits: Limits


def _token_array(values, field: str, vocab_size: int) -> np.ndarray:
    ids = np.asarray(values, dtype=np.int64)
    if ids.size == 0:
        raise RequestError(f"{field}: empty sequence; at least one token is required")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise RequestError(f"{field}[{i}] = {ids[i]}: outside the vocabulary [0, {vocab_size})")
    return ids


def _temperature(message, field: str, *, allow_zero: bool) -> float:
    if not message.HasField(field):
        return 1.0
    value = getattr(message, field)
    low_ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and low_ok):
        bound = ">= 0 (0 is greedy)" if allow_zero else "> 0"
        raise RequestError(f"{field} = {value}: must be a finite number {bound}")
    return float(value)


def _check_counts(count: int, tokens: int, what: str, limits: Limits) -> None:
    if count == 0:
        raise RequestError(f"{what}: at least one is required")
    if count > limits.max_sequences_per_request:
        raise RequestError(
            f"{what}: {count} in one request, over max_sequences_per_request = "
            f"{limits.max_sequences_per_request}; split the request",
            too_large=True,
        )
    if tokens > limits.max_tokens_per_request:
        raise RequestError(
            f"{what}: {tokens} tokens in one request, over max_tokens_per_request = "
            f"{limits.max_tokens_per_request}; split the request",
            too_large=True,
        )


def _candidates(message: pb.Tensor, field: str, rows: int, vocab_size: int) -> torch.Tensor:
    try:
        name = dtype_name(message.dtype)
        if name not in ("int32", "int64"):
            raise CodecError(f"dtype {name}: candidate ids must be INT32 or INT64")
        ids = decode_numpy(message).astype(np.int64)
    except CodecError as error:
        raise RequestError(f"{field}: {error}") from None
    if ids.ndim not in (1, 2) or (ids.ndim == 2 and ids.shape[0] != rows) or ids.shape[-1] == 0:
        raise RequestError(
            f"{field}: shape {list(ids.shape)}; expected [{rows}, m] (one row per scored "
            "position) or [m] (the same ids for every position), m >= 1"
        )
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if bad.size:
        where = ", ".join(str(int(i)) for i in bad[0])
        raise RequestError(
            f"{field}[{where}] = {ids[tuple(bad[0])]}: outside the vocabulary [0, {vocab_size})"
        )
    return torch.from_numpy(ids)


def score_options(
    request: pb.ScoreRequest, model: ModelLimits, *, ranks: bool = False
) -> ScoreOptions:
    if not 0 <= request.top_k <= model.vocab_size:
        raise RequestError(f"top_k = {request.top_k}: must be in [0, {model.vocab_size}]")
    try:
        dtype = "float32" if request.dtype == pb.DTYPE_UNSPECIFIED else dtype_name(request.dtype)
    except CodecError:
        raise RequestError(f"dtype = {request.dtype}: unknown dtype") from None
    if dtype not in LOGPROB_DTYPES:
        raise RequestError(
            f"dtype = {dtype.upper()}: log-probs come as FLOAT32, FLOAT16 or BFLOAT16"
        )
    return ScoreOptions(
        top_k=request.top_k,
        full=request.full,
        temperature=_temperature(request, "temperature", allow_zero=False),
        dtype=torch_dtype(dtype),
        ranks=ranks,
    )


def parse_score_request(
    request: pb.ScoreRequest, model: ModelLimits, *, ranks: bool = False
) -> list[ScoreItem]:
    """Check every field of a ScoreRequest; return one ScoreItem per sequence."""
    limits = model.limits
    total = sum(len(s.token_ids) for s in request.sequences)
    _check_counts(len(request.sequences), total, "sequences", limits)
    options = score_options(request, model, ranks=ranks)
    items, scored_rows, candidate_cells = [], 0, 0
    for n, sequence in enumerate(request.sequences):
        field = f"sequences[{n}]"
        ids = _token_array(sequence.token_ids, f"{field}.token_ids", model.vocab_size)
        if not 1 <= sequence.score_from < ids.size:
            raise RequestError(
                f"{field}.score_from = {sequence.score_from}: must satisfy "
                f"1 <= score_from < len(token_ids) = {ids.size}"
            )
        if ids.size > model.max_seq_len:
            raise RequestError(
                f"{field}.token_ids: {ids.size} tokens, longer than the model's "
                f"max_seq_len = {model.max_seq_len}"
            )
        if ids.size - 1 > limits.max_batch_tokens:
            raise RequestError(
                f"{field}.token_ids: {ids.size} tokens do not fit one forward pass "
                f"(max_batch_tokens = {limits.max_batch_tokens})",
                too_large=True,
            )
        rows = ids.size - sequence.score_from
        candidates = None
        if sequence.HasField("candidate_ids"):
            candidates = _candidates(
                sequence.candidate_ids, f"{field}.candidate_ids", rows, model.vocab_size
            )
            candidate_cells += rows * candidates.shape[-1]
        scored_rows += rows
        items.append(
            ScoreItem(torch.from_numpy(ids), int(sequence.score_from), options, candidates)
        )
    _check_response_size(scored_rows, candidate_cells, options, model)
    return items


def _check_response_size(
    rows: int, candidate_cells: int, options: ScoreOptions, model: ModelLimits
) -> None:
    """Refuse up front what could not be sent back (mostly full=true on a big vocabulary)."""
    itemsize = torch.empty((), dtype=options.dtype).element_size()
    per_row = itemsize * (1 + options.top_k + model.vocab_size * options.full) + 4 * options.top_k
    size = rows * per_row + candidate_cells * itemsize
    if size > model.limits.max_message_bytes:
        full = f", full log-probs over {model.vocab_size} tokens" if options.full else ""
        raise RequestError(
            f"the response would hold about {size} bytes ({rows} scored positions{full}"
            f"), over max_message_bytes = {model.limits.max_message_bytes}; "
            "ask for fewer sequences, a smaller top_k or full = false",
            too_large=True,
        )


def parse_generate_request(
    request: pb.GenerateRequest, model: ModelLimits
) -> tuple[list[list[int]], SamplingOptions]:
    """Check every field of a GenerateRequest; return the prompts and the sampling options."""
    if request.max_new_tokens < 1:
        raise RequestError(f"max_new_tokens = {request.max_new_tokens}: must be >= 1")
    total = sum(len(p.token_ids) + request.max_new_tokens for p in request.prompts)
    _check_counts(len(request.prompts), total, "prompts", model.limits)
    temperature = _temperature(request, "temperature", allow_zero=True)
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise RequestError(f"top_p = {top_p}: must be in (0, 1]")
    prompts = []
    for n, prompt in enumerate(request.prompts):
        ids = _token_array(prompt.token_ids, f"prompts[{n}].token_ids", model.vocab_size)
        if ids.size + request.max_new_tokens > model.max_seq_len:
            raise RequestError(
                f"prompts[{n}]: {ids.size} prompt tokens + max_new_tokens = "
                f"{request.max_new_tokens} exceed the model's max_seq_len = {model.max_seq_len}"
            )
        if ids.size + request.max_new_tokens > model.limits.max_batch_tokens:
            raise RequestError(
                f"prompts[{n}]: {ids.size} prompt tokens + max_new_tokens = "
                f"{request.max_new_tokens} do not fit one batch "
                f"(max_batch_tokens = {model.limits.max_batch_tokens})",
                too_large=True,
            )
        prompts.append(ids.tolist())
    options = SamplingOptions(
        max_new_tokens=request.max_new_tokens,
        temperature=temperature,
        top_p=float(top_p),
        seed=request.seed if request.HasField("seed") else 0,
        stop_at_eos=not request.ignore_eos,
    )
    return prompts, options
