"""Request validation: the engine's plain requests -> checked work items, or an error
naming the field in the caller's own terms (requests.Names).

Runs before anything is queued, so a bad request never reaches a batch and never affects
anyone else's. Front-end neutral: each front end maps RequestError through errors.STATUS.
"""

from __future__ import annotations

import math
from collections import abc
from dataclasses import dataclass

import numpy as np
import torch

from causal_lm.sampling import SamplingOptions
from teacher_client.codec import LOGPROB_DTYPES
from teacher_service.backend_api import ScoreItem
from teacher_service.codec import torch_dtype
from teacher_service.config import Limits
from teacher_service.errors import ErrorKind, RequestError
from teacher_service.requests import GenerateRequest, ScoreRequest
from teacher_service.scoring import ScoreOptions

TOO_LARGE = ErrorKind.TOO_LARGE


@dataclass(frozen=True)
class ModelLimits:
    """What the loaded model accepts, next to the configured request limits."""

    vocab_size: int
    max_seq_len: int
    limits: Limits


def token_ids(values: abc.Sequence[int] | np.ndarray, field: str, vocab_size: int) -> np.ndarray:
    """The ids as int64, or a RequestError naming the first one outside the vocabulary."""
    try:
        ids = np.asarray(values, dtype=np.int64)
    except OverflowError:  # beyond 64 bits (JSON integers are unbounded)
        ids = np.asarray([v if -(2**63) <= v < 2**63 else -1 for v in values], dtype=np.int64)
    if ids.size == 0:
        raise RequestError(f"{field}: empty sequence; at least one token is required", field=field)
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise RequestError(
            f"{field}[{i}] = {values[i]}: outside the vocabulary [0, {vocab_size})",
            field=f"{field}[{i}]",
        )
    return ids


def temperature(value: float | None, field: str, *, allow_zero: bool) -> float:
    """The temperature (1 when unset): finite, > 0, or >= 0 where 0 means greedy."""
    if value is None:
        return 1.0
    low_ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and low_ok):
        bound = ">= 0 (0 is greedy)" if allow_zero else "> 0"
        raise RequestError(f"{field} = {value}: must be a finite number {bound}", field=field)
    return float(value)


def top_p(value: float | None, field: str) -> float:
    """The nucleus mass (1 when unset), in (0, 1]."""
    if value is None:
        return 1.0
    if not (math.isfinite(value) and 0 < value <= 1):
        raise RequestError(f"{field} = {value}: must be in (0, 1]", field=field)
    return float(value)


def _check_counts(count: int, tokens: int, what: str, limits: Limits) -> None:
    if count == 0:
        raise RequestError(f"{what}: at least one is required", field=what)
    if count > limits.max_sequences_per_request:
        raise RequestError(
            f"{what}: {count} in one request, over max_sequences_per_request = "
            f"{limits.max_sequences_per_request}; split the request",
            field=what,
            kind=TOO_LARGE,
        )
    if tokens > limits.max_tokens_per_request:
        raise RequestError(
            f"{what}: {tokens} tokens in one request, over max_tokens_per_request = "
            f"{limits.max_tokens_per_request}; split the request",
            field=what,
            kind=TOO_LARGE,
        )


def _candidates(ids: np.ndarray, field: str, rows: int, vocab_size: int) -> torch.Tensor:
    if ids.ndim not in (1, 2) or (ids.ndim == 2 and ids.shape[0] != rows) or ids.shape[-1] == 0:
        raise RequestError(
            f"{field}: shape {list(ids.shape)}; expected [{rows}, m] (one row per scored "
            "position) or [m] (the same ids for every position), m >= 1",
            field=field,
        )
    ids = ids.astype(np.int64)
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if bad.size:
        where = ", ".join(str(int(i)) for i in bad[0])
        raise RequestError(
            f"{field}[{where}] = {ids[tuple(bad[0])]}: outside the vocabulary [0, {vocab_size})",
            field=f"{field}[{where}]",
        )
    return torch.from_numpy(ids)


def score_options(request: ScoreRequest, model: ModelLimits) -> ScoreOptions:
    if not 0 <= request.top_k <= model.vocab_size:
        raise RequestError(
            f"top_k = {request.top_k}: must be in [0, {model.vocab_size}]", field="top_k"
        )
    if request.dtype not in LOGPROB_DTYPES:
        raise RequestError(
            f"dtype = {request.dtype.upper()}: log-probs come as FLOAT32, FLOAT16 or BFLOAT16",
            field="dtype",
        )
    return ScoreOptions(
        top_k=request.top_k,
        full=request.full,
        temperature=temperature(request.temperature, "temperature", allow_zero=False),
        dtype=torch_dtype(request.dtype),
        ranks=request.ranks,
    )


def parse_score_request(request: ScoreRequest, model: ModelLimits) -> list[ScoreItem]:
    """Check every field of a ScoreRequest; return one ScoreItem per sequence."""
    limits, names = model.limits, request.names
    total = sum(len(s.token_ids) for s in request.sequences)
    _check_counts(len(request.sequences), total, names.sequences, limits)
    options = score_options(request, model)
    items, scored_rows, candidate_cells = [], 0, 0
    for n, sequence in enumerate(request.sequences):
        where = names.item(n, sequence.path)
        ids_field = where + names.token_ids
        ids = token_ids(sequence.token_ids, ids_field, model.vocab_size)
        if not 1 <= sequence.score_from < ids.size:
            field = where + names.score_from
            raise RequestError(
                f"{field} = {sequence.score_from}: must satisfy "
                f"1 <= score_from < len(token_ids) = {ids.size}",
                field=field,
            )
        if ids.size > model.max_seq_len:
            raise RequestError(
                f"{ids_field}: {ids.size} tokens, longer than the model's "
                f"max_seq_len = {model.max_seq_len}",
                field=ids_field,
            )
        if ids.size - 1 > limits.max_batch_tokens:
            raise RequestError(
                f"{ids_field}: {ids.size} tokens do not fit one forward pass "
                f"(max_batch_tokens = {limits.max_batch_tokens})",
                field=ids_field,
                kind=TOO_LARGE,
            )
        rows = ids.size - sequence.score_from
        candidates = None
        if sequence.candidate_ids is not None:
            field = where + names.candidate_ids
            candidates = _candidates(sequence.candidate_ids, field, rows, model.vocab_size)
            candidate_cells += rows * candidates.shape[-1]
        scored_rows += rows
        items.append(
            ScoreItem(
                torch.from_numpy(ids), int(sequence.score_from), options, candidates, field=where
            )
        )
    _check_response_size(scored_rows, candidate_cells, options, model)
    return items


def _check_response_size(
    rows: int, candidate_cells: int, options: ScoreOptions, model: ModelLimits
) -> None:
    """Refuse up front what could not be sent back (mostly full=true on a big vocabulary)."""
    itemsize = options.dtype.itemsize
    per_row = itemsize * (1 + options.top_k + model.vocab_size * options.full) + 4 * options.top_k
    size = rows * per_row + candidate_cells * itemsize
    if size > model.limits.max_message_bytes:
        full = f", full log-probs over {model.vocab_size} tokens" if options.full else ""
        raise RequestError(
            f"the response would hold about {size} bytes ({rows} scored positions{full}"
            f"), over max_message_bytes = {model.limits.max_message_bytes}; "
            "ask for fewer sequences, a smaller top_k or full = false",
            kind=TOO_LARGE,
        )


def parse_generate_request(
    request: GenerateRequest, model: ModelLimits
) -> tuple[list[list[int]], SamplingOptions]:
    """Check every field of a GenerateRequest; return the prompts and the sampling options."""
    names, max_new = request.names, request.max_new_tokens
    if max_new < 1:
        raise RequestError(
            f"{names.max_new_tokens} = {max_new}: must be >= 1", field=names.max_new_tokens
        )
    total = sum(len(p.token_ids) + max_new for p in request.prompts)
    _check_counts(len(request.prompts), total, names.sequences, model.limits)
    options = SamplingOptions(
        max_new_tokens=max_new,
        temperature=temperature(request.temperature, "temperature", allow_zero=True),
        top_p=top_p(request.top_p, "top_p"),
        seed=0 if request.seed is None else request.seed,
        stop_at_eos=not request.ignore_eos,
    )
    prompts = []
    for n, prompt in enumerate(request.prompts):
        where = names.item(n, prompt.path)
        ids = token_ids(prompt.token_ids, where + names.token_ids, model.vocab_size)
        if ids.size + max_new > model.max_seq_len:
            raise RequestError(
                f"{where}: {ids.size} prompt tokens + {names.max_new_tokens} = {max_new} "
                f"exceed the model's max_seq_len = {model.max_seq_len}",
                field=where,
            )
        if ids.size + max_new > model.limits.max_batch_tokens:
            raise RequestError(
                f"{where}: {ids.size} prompt tokens + {names.max_new_tokens} = {max_new} "
                f"do not fit one batch (max_batch_tokens = {model.limits.max_batch_tokens})",
                field=where,
                kind=TOO_LARGE,
            )
        prompts.append(ids.tolist())
    return prompts, options
