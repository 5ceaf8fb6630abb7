"""Request and response messages: plain Python and numpy on one side, the proto on the other.

Pure functions, shared by the blocking and the asyncio client (and usable alone, e.g. to
build requests for another transport). Field semantics: docs/design.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from teacher_client.codec import LOGPROB_DTYPES, decode_numpy, dtype_enum, encode_numpy
from teacher_client.fingerprint import tokenizer_fingerprint
from teacher_client.proto import teacher_pb2 as pb


class TokenizerMismatchError(ValueError):
    """The trainer's tokenizer assigns ids differently from the teacher's."""


@dataclass(frozen=True)
class TeacherInfo:
    model_id: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_seq_len: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    backend: str
    device: str
    model_dtype: str
    max_batch_tokens: int
    max_tokens_per_request: int
    max_sequences_per_request: int
    max_message_bytes: int
    capabilities: tuple[str, ...]
    server_version: str


@dataclass(frozen=True)
class ScoreOptions:
    """What a Score call asks for at every scored position (docs/design.md, "Scoring
    semantics"): the one place these options are spelled out, for the client, the request
    builder, the in-process teacher and the trainer's Teacher interface alike. The
    student's own candidate ids are not an option but data, one list per sequence."""

    top_k: int = 64  # the teacher's k most likely tokens per position (0: none)
    full: bool = False  # the whole log-softmax row per position
    temperature: float = 1.0  # the teacher's logits are divided by it before log_softmax
    dtype: str = "float32"  # wire dtype of the log-probs: float32 | bfloat16 | float16


SCORE_OPTION_NAMES = tuple(field.name for field in fields(ScoreOptions))


def merge_score_options(
    options: ScoreOptions | None, option_fields: Mapping[str, Any]
) -> ScoreOptions:
    """`options` (ScoreOptions() when None) with `option_fields` replacing its fields: how
    the clients take both `score(seqs, 0, options)` and `score(seqs, 0, top_k=5, full=True)`.
    A name that is not a ScoreOptions field is a TypeError naming it."""
    unknown = [name for name in option_fields if name not in SCORE_OPTION_NAMES]
    if unknown:
        known = ", ".join(SCORE_OPTION_NAMES)
        named = ", ".join(map(repr, unknown))
        raise TypeError(f"unknown score option {named}: ScoreOptions has {known}")
    return replace(ScoreOptions() if options is None else options, **option_fields)


@dataclass
class ScoreResult:
    """One sequence's teacher signal; row j is position score_from + j."""

    target_logprobs: np.ndarray  # [T]
    topk_ids: np.ndarray | None  # [T, k] int32
    topk_logprobs: np.ndarray | None  # [T, k]
    candidate_logprobs: np.ndarray | None  # [T, m]
    full_logprobs: np.ndarray | None  # [T, V]


@dataclass
class GenerateResult:
    token_ids: list[int]  # new tokens only; ends with the eos when finish_reason == "eos"
    finish_reason: str  # "eos" or "length"


def _ids(values: Any, what: str) -> list[int]:
    array = np.asarray(values)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{what}: expected a 1-D sequence of integer token ids")
    return array.astype(np.int64).tolist()


def _per_sequence_candidates(candidates: Any, count: int) -> list[Any]:
    """None, one id list shared by every sequence and row, or one entry per sequence."""
    if candidates is None:
        return [None] * count
    per_sequence = (
        isinstance(candidates, (list, tuple))
        and len(candidates) == count
        and all(c is None or np.ndim(c) >= 1 for c in candidates)
    )
    return list(candidates) if per_sequence else [candidates] * count


def build_score_request(
    sequences: Sequence[Any],
    score_from: int | Sequence[int],
    options: ScoreOptions = ScoreOptions(),
    *,
    candidates: Any = None,
    request_id: str = "",
) -> pb.ScoreRequest:
    """The ScoreRequest proto: `options` for every sequence, `candidates` None, one id list
    shared by all, or one per sequence."""
    if options.dtype not in LOGPROB_DTYPES:
        raise ValueError(f"dtype = {options.dtype!r}: expected one of {LOGPROB_DTYPES}")
    starts = [score_from] * len(sequences) if isinstance(score_from, int) else list(score_from)
    if len(starts) != len(sequences):
        raise ValueError(f"score_from: {len(starts)} values for {len(sequences)} sequences")
    request = pb.ScoreRequest(
        top_k=options.top_k,
        full=options.full,
        temperature=options.temperature,
        dtype=dtype_enum(options.dtype),
        request_id=request_id,
    )
    for n, (tokens, start, cands) in enumerate(
        zip(sequences, starts, _per_sequence_candidates(candidates, len(sequences)))
    ):
        sequence = request.sequences.add(
            token_ids=_ids(tokens, f"sequences[{n}]"), score_from=start
        )
        if cands is not None:
            sequence.candidate_ids.CopyFrom(encode_numpy(np.asarray(cands), "int32"))
    return request


def parse_score_response(response: pb.ScoreResponse) -> list[ScoreResult]:
    def get(message: pb.SequenceScores, name: str) -> np.ndarray | None:
        return decode_numpy(getattr(message, name)) if message.HasField(name) else None

    return [
        ScoreResult(
            target_logprobs=decode_numpy(r.target_logprobs),
            topk_ids=get(r, "topk_ids"),
            topk_logprobs=get(r, "topk_logprobs"),
            candidate_logprobs=get(r, "candidate_logprobs"),
            full_logprobs=get(r, "full_logprobs"),
        )
        for r in response.results
    ]


def build_generate_request(
    prompts: Sequence[Any],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
    request_id: str = "",
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompts=[pb.Prompt(token_ids=_ids(p, f"prompts[{n}]")) for n, p in enumerate(prompts)],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        ignore_eos=not stop_at_eos,
        request_id=request_id,
    )


def parse_generate_response(response: pb.GenerateResponse) -> list[GenerateResult]:
    return [GenerateResult(list(c.token_ids), c.finish_reason) for c in response.completions]


# token ids the proto sends as -1 when the tokenizer has none (TeacherInfo: None)
OPTIONAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def parse_info(response: pb.InfoResponse) -> TeacherInfo:
    values = {field.name: getattr(response, field.name) for field in fields(TeacherInfo)}
    values |= {name: None if values[name] < 0 else values[name] for name in OPTIONAL_TOKEN_IDS}
    return TeacherInfo(**values | {"capabilities": tuple(response.capabilities)})


def info_to_proto(info: TeacherInfo) -> pb.InfoResponse:
    """parse_info's inverse: what a server sends (None token ids as -1)."""
    values = asdict(info)
    values |= {name: -1 if values[name] is None else values[name] for name in OPTIONAL_TOKEN_IDS}
    return pb.InfoResponse(**values)


def compare_tokenizer(info: TeacherInfo, tokenizer: Any) -> None:
    """Raise TokenizerMismatchError, saying how they differ, unless the fingerprints agree."""
    local = tokenizer_fingerprint(tokenizer)
    if local == info.tokenizer_fingerprint:
        return
    differences = []
    if len(tokenizer) != info.vocab_size:
        differences.append(
            f"vocabulary size {info.vocab_size} (teacher) vs {len(tokenizer)} (yours)"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        theirs, ours = getattr(info, name), getattr(tokenizer, name, None)
        if theirs != ours:
            differences.append(f"{name} {theirs} (teacher) vs {ours} (yours)")
    if not differences:
        differences.append("the same size and special tokens, but different tokens at some ids")
    raise TokenizerMismatchError(
        f"the teacher {info.model_id!r} uses a different tokenizer: {'; '.join(differences)} "
        f"(fingerprint {info.tokenizer_fingerprint[:12]} vs {local[:12]}). Its log-probs would "
        "refer to other tokens; use the teacher's tokenizer for the student."
    )
