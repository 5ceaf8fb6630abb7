"""verl's GKD teacher protocol over ZeroMQ: `teacher-service serve --zmq-port N`.

verl's on-policy distillation recipe (volcengine/verl, `recipe/gkd/`, 2025; read at
commit 22bd6ef for client.py and worker.py, 1eb246e for vllm_engine.py; since January 2026
in verl-project/verl-recipe, `gkd/megatron/`, unchanged on the wire) asks its teacher
for top-k log-probs over ZeroMQ with `torch.save` payloads: its `TeacherClient`
(`recipe/gkd/teacher/client.py`) sends from REQ sockets to a ROUTER (`proxy.py`) in front
of vLLM workers (`worker.py`, `vllm_engine.py`). This front end stands in for proxy and
workers, so a verl trainer pointed at it (`actor_rollout_ref.teacher.server_ip/port`)
works unchanged, on the engine and batcher that gRPC and HTTP use: admission, metrics
and the error kinds of errors.py apply to it as to them.

The request, a dict (`torch.save` bytes, one frame):

- `prompt_token_ids`: the sequences, a list of lists of ints (or 1-D integer tensors, or
  one 2-D integer tensor). verl sends whole sequences, prompt + response, unpadded.
- `max_tokens`: an int or one per sequence, >= 1; default 1. 1 (what verl's GKD trainer
  sends) scores the sequence, and generates nothing; m > 1 first samples up to m tokens
  after the sequence (Generate's sampler, at `temperature`, top_p 1, a fresh seed), then
  scores sequence + response.
- `temperature` (default 1; 0 samples greedily and scores at 1), `only_response` (bool,
  default false), and this service's extension `top_k` (default: `--zmq-top-k`).

The reply, a dict: `status` "ok", and per sequence (in order) `responses` (int32 [n]:
the generated tokens; empty when max_tokens = 1), `teacher_topk_indices` (int32
[rows, k]) and `teacher_topk_logprobs` (float32 [rows, k]), most likely first. Row i is
the teacher's distribution given tokens [0, i], i.e. over the token after position i
(vLLM's prompt log-probs followed by its sampled-token log-probs):

- without only_response: one row per token sent, then one per generated token beyond the
  first: L rows when scoring (L = the sequence's length), L - 1 + n with n tokens
  generated. verl's trainer scatters them onto its attention mask, one row per token.
- with only_response: the rows after the sequence only: 1 when scoring (the distribution
  of the next token), n with n tokens generated.

The row after the last token comes from scoring the sequence extended by a placeholder
token (id 0): its logits are those at the last position, and top-k does not depend on
the target; the placeholder's own log-prob is dropped. So the reply equals gRPC Score's
top-k for `token_ids + [0]` with `score_from` 1 (or len(token_ids)), bit for bit.

An error reply is verl's `{"status": "error", "reason": message}` (verl's client raises
RuntimeError("Teacher error: <reason>")) plus `kind` (errors.ErrorKind's value), `field`
(the request's path, e.g. `prompt_token_ids[3][7]`) and, when overloaded, `retry_after`
(seconds). A malformed request (not a torch payload, a wrong field or type, an id out of
the vocabulary) gets one; the server goes on serving.

Security: `torch.load` of arbitrary bytes would run code, so payloads are read with
`weights_only=True` (plain containers, numbers, strings, tensors). The port has no auth
and no TLS: it listens on loopback unless `--zmq-host` says otherwise, and config.py
refuses a non-loopback ZeroMQ host when the other front ends require auth or TLS. Reply
tensors are copies, never views of a batch's tensors (torch.save writes a view's whole
storage, which would hold other callers' rows). A message over `--max-message-mb` makes
ZeroMQ drop the connection (ZMQ_MAXMSGSIZE): no reply.

Laid out as the HTTP dialects are: the request with its conversion into the engine's
requests, the serving function (`answer`), then the socket (`ZmqServer`).
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import secrets
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch
import zmq
import zmq.asyncio

from teacher_service import validation
from teacher_service.deadlines import set_peer
from teacher_service.engine import Engine
from teacher_service.errors import (
    GRPC_FAILURE_CODES,
    ErrorKind,
    Failure,
    PeerWarnings,
    RequestError,
    report,
)
from teacher_service.metrics import FrontEndLabels
from teacher_service.requests import GenerateRequest, Names, Prompt, ScoreRequest, Sequence

log = logging.getLogger(__name__)
PLACEHOLDER_ID = 0  # appended so that the row after the last token is scored (see above)
FIELDS = ("prompt_token_ids", "max_tokens", "temperature", "only_response", "top_k")
# the engine's errors name the request's fields: a sequence is `prompt_token_ids[n]`
NAMES = Names(
    sequences="prompt_token_ids",
    token_ids="",
    score_from="",
    candidate_ids="",
    max_new_tokens="max_tokens",
)
# a reply's status label: gRPC's names (the error table's), one method
METRIC_LABELS = FrontEndLabels("zmq", ("GKD",), "OK", GRPC_FAILURE_CODES)
SEND_LINGER_MS = 1000  # on close, queued replies get this long to leave


class MalformedRequest(RequestError):
    kind = ErrorKind.MALFORMED_BODY


# --- the request -------------------------------------------------------------------------


def decode(payload: bytes) -> Any:
    """torch.load with weights_only=True: data, never code (a pickle could run anything)."""
    try:
        return torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as error:
        raise MalformedRequest(
            f"request: not a torch.save payload that loads with weights_only=True "
            f"({type(error).__name__}: {str(error)[:200]})",
            field="request",
        ) from None


def encode(reply: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(reply, buffer)
    return buffer.getvalue()


def _int(value: Any, field: str) -> int:
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{field}: expected an int, got {type(value).__name__}", field=field)
    return value


def _ids(value: Any, field: str, vocab_size: int) -> list[int]:
    """One sequence: a list of ints or a 1-D integer tensor, every id in the vocabulary."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.is_floating_point() or value.dtype == torch.bool:
            raise RequestError(
                f"{field}: a {value.dim()}-D {value.dtype} tensor; expected token ids, a 1-D "
                "integer tensor or a list of ints",
                field=field,
            )
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise RequestError(
            f"{field}: expected a list of token ids, got {type(value).__name__}", field=field
        )
    ids = [_int(token, f"{field}[{i}]") for i, token in enumerate(value)]
    return validation.token_ids(ids, field, vocab_size).tolist()


@dataclass(frozen=True)
class GkdRequest:
    """verl's teacher request, checked: every problem names its field."""

    prompt_token_ids: list[list[int]]
    max_tokens: list[int]  # one per sequence
    temperature: float  # 0: greedy sampling, scored at 1
    only_response: bool
    top_k: int

    @classmethod
    def parse(
        cls, payload: Any, vocab_size: int, max_seq_len: int, default_top_k: int
    ) -> GkdRequest:
        if not isinstance(payload, dict):
            raise RequestError(
                f"request: expected a dict with prompt_token_ids, got {type(payload).__name__}",
                field="request",
            )
        unknown = sorted(str(key) for key in payload if key not in FIELDS)
        if unknown:
            raise RequestError(
                f"{unknown[0]}: unknown field (the request has {', '.join(FIELDS)})",
                field=unknown[0],
            )
        if "prompt_token_ids" not in payload:
            raise RequestError("prompt_token_ids: required", field="prompt_token_ids")
        sequences = payload["prompt_token_ids"]
        if isinstance(sequences, torch.Tensor) and sequences.dim() == 2:
            sequences = list(sequences)
        if not isinstance(sequences, list | tuple) or not sequences:
            raise RequestError(
                "prompt_token_ids: expected a non-empty list of sequences", field="prompt_token_ids"
            )
        ids = [
            _ids(sequence, f"prompt_token_ids[{n}]", vocab_size)
            for n, sequence in enumerate(sequences)
        ]
        max_tokens = payload.get("max_tokens", 1)
        if isinstance(max_tokens, list | tuple):  # one per sequence (verl's max_seq_len cap)
            if len(max_tokens) != len(ids):
                raise RequestError(
                    f"max_tokens: {len(max_tokens)} values for {len(ids)} sequences",
                    field="max_tokens",
                )
            named = [(f"max_tokens[{n}]", m) for n, m in enumerate(max_tokens)]
        else:
            named = [("max_tokens", max_tokens)] * len(ids)
        counts = [_int(value, field) for field, value in named]
        for (field, _), count in zip(named, counts):
            if count < 1:
                raise RequestError(f"{field} = {count}: must be >= 1", field=field)
        for n, (sequence, count) in enumerate(zip(ids, counts)):
            if len(sequence) + count > max_seq_len:  # the rows after it need positions too
                raise RequestError(
                    f"prompt_token_ids[{n}]: {len(sequence)} tokens + max_tokens = {count} "
                    f"(the rows after the sequence) exceed the model's max_seq_len = "
                    f"{max_seq_len}",
                    field=f"prompt_token_ids[{n}]",
                )
        temperature = payload.get("temperature")
        if temperature is not None and (
            isinstance(temperature, bool) or not isinstance(temperature, int | float)
        ):
            raise RequestError(
                f"temperature: expected a number, got {type(temperature).__name__}",
                field="temperature",
            )
        only_response = payload.get("only_response", False)
        if not isinstance(only_response, bool):
            raise RequestError(
                f"only_response: expected a bool, got {type(only_response).__name__}",
                field="only_response",
            )
        top_k = payload.get("top_k")
        top_k = min(default_top_k, vocab_size) if top_k is None else _int(top_k, "top_k")
        if not 1 <= top_k <= vocab_size:
            raise RequestError(f"top_k = {top_k}: must be in [1, {vocab_size}]", field="top_k")
        return cls(
            ids,
            counts,
            validation.temperature(temperature, "temperature", allow_zero=True),
            only_response,
            top_k,
        )

    def to_generate_requests(self, seed: int) -> dict[int, GenerateRequest]:
        """One GenerateRequest per max_tokens > 1 (the engine takes one length a call)."""
        groups: dict[int, list[int]] = {}
        for n, count in enumerate(self.max_tokens):
            if count > 1:
                groups.setdefault(count, []).append(n)
        return {
            count: GenerateRequest(
                [Prompt(self.prompt_token_ids[n], f"prompt_token_ids[{n}]") for n in members],
                max_new_tokens=count,
                temperature=self.temperature,
                seed=seed,
                names=NAMES,
            )
            for count, members in groups.items()
        }

    def to_score_request(self, responses: Seq[list[int]]) -> ScoreRequest:
        """Sequence n + its response (or the placeholder), scored from 1 or from its end."""
        sequences = []
        for n, (ids, response) in enumerate(zip(self.prompt_token_ids, responses, strict=True)):
            tail = response or [PLACEHOLDER_ID]
            first = len(ids) if self.only_response else 1
            sequences.append(Sequence(ids + tail, first, path=f"prompt_token_ids[{n}]"))
        return ScoreRequest(
            sequences,
            top_k=self.top_k,
            temperature=self.temperature or 1.0,
            names=NAMES,
        )


# --- serving -----------------------------------------------------------------------------


async def answer(payload: Any, engine: Engine, default_top_k: int) -> dict[str, Any]:
    """Validate, generate where asked (max_tokens > 1), then score everything in one call."""
    backend = engine.backend
    request = GkdRequest.parse(payload, backend.vocab_size, backend.max_seq_len, default_top_k)
    responses: list[list[int]] = [[] for _ in request.prompt_token_ids]
    generations = request.to_generate_requests(seed=secrets.randbits(64))
    if generations:
        results = await asyncio.gather(
            *(engine.generate(g) for g in generations.values()),
            return_exceptions=True,  # wait for all, then raise the first failure
        )
        for outcome in results:
            if isinstance(outcome, BaseException):
                raise outcome
        for count, completions in zip(generations, results, strict=True):
            members = [n for n, m in enumerate(request.max_tokens) if m == count]
            for n, completion in zip(members, completions, strict=True):
                responses[n] = list(completion.token_ids)
    scores = await engine.score(request.to_score_request(responses))
    return {
        "status": "ok",
        "responses": [torch.tensor(r, dtype=torch.int32) for r in responses],
        # copies: a view would carry its whole storage, other callers' rows included
        "teacher_topk_logprobs": [s.topk_logprobs.float().clone() for s in scores],
        "teacher_topk_indices": [s.topk_ids.to(torch.int32).clone() for s in scores],
    }


def error_reply(failure: Failure) -> dict[str, Any]:
    """verl's error shape (status, reason), plus the kind and the field it names."""
    reply: dict[str, Any] = {"status": "error", "reason": failure.message}
    reply |= {"kind": failure.kind.value, "field": failure.field}
    if failure.retry_after is not None:
        reply["retry_after"] = float(failure.retry_after)
    return reply


# --- the socket ----------------------------------------------------------------------------


def endpoint(host: str, port: int) -> str:
    """tcp://host:port for bind; port 0 asks ZeroMQ for a free one (`*`)."""
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"tcp://{bracketed}:{port or '*'}"


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """ROUTER frames -> (the envelope to send back, the body). A REQ peer (verl's client)
    sends [identity, b"", payload]; a DEALER may leave out the empty delimiter."""
    for i in range(1, len(frames)):
        if not frames[i]:
            return frames[: i + 1], frames[i + 1 :]
    return frames[:1], frames[1:]


class ZmqServer:
    """A ROUTER socket on the engine's event loop: each request is answered by a task of
    its own, so many clients (and many requests of one DEALER) are served concurrently
    and batched together by the engine. Replies to one peer leave in the order of its
    requests: a DEALER that pipelines requests (the protocol has no request id) can match
    them up."""

    def __init__(
        self, engine: Engine, socket: zmq.asyncio.Socket, context: zmq.asyncio.Context, port: int
    ) -> None:
        self.engine, self.port = engine, port
        self._socket, self._context = socket, context
        self._tasks: set[asyncio.Task] = set()
        self._last: dict[bytes, asyncio.Task] = {}  # each peer's latest request
        self._send_lock = asyncio.Lock()
        self._warnings = PeerWarnings()
        self.default_top_k = engine.config.zmq_top_k
        self._receiver = asyncio.create_task(self._receive(), name="zmq-receiver")

    @classmethod
    async def start(cls, engine: Engine, host: str, port: int) -> ZmqServer:
        context = zmq.asyncio.Context()
        socket = context.socket(zmq.ROUTER)
        address = endpoint(host, port)
        try:
            socket.setsockopt(zmq.LINGER, SEND_LINGER_MS)
            socket.setsockopt(zmq.MAXMSGSIZE, engine.config.limits.max_message_bytes)
            if ":" in host:
                socket.setsockopt(zmq.IPV6, 1)
            socket.bind(address)
            bound = socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        except zmq.ZMQError as error:  # an OSError, as the other front ends report it
            socket.close(linger=0)
            context.term()
            raise OSError(f"cannot listen on {address} for ZeroMQ: {error}") from None
        engine.metrics.expect_requests(METRIC_LABELS)
        return cls(engine, socket, context, int(bound.rsplit(":", 1)[1]))

    async def _receive(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            peer = frames[0]
            task = asyncio.create_task(self._serve(frames, self._last.get(peer)))
            self._tasks.add(task)
            self._last[peer] = task
            task.add_done_callback(functools.partial(self._forget, peer))

    def _forget(self, peer: bytes, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if self._last.get(peer) is task:
            del self._last[peer]

    async def _serve(self, frames: list[bytes], previous: asyncio.Task | None) -> None:
        envelope, body = split_envelope(frames)
        started, status = time.perf_counter(), METRIC_LABELS.success
        try:
            if len(body) != 1:
                raise MalformedRequest(
                    f"request: {len(body)} body frames; expected one torch.save payload",
                    field="request",
                )
            set_peer(f"zmq:{envelope[0].hex()}")  # the identity ROUTER gave the peer
            payload = await asyncio.to_thread(decode, body[0])
            reply = await answer(payload, self.engine, self.default_top_k)
            message = await asyncio.to_thread(encode, reply)
        except Exception as error:
            failure = report(error)
            status = failure.status.grpc.name
            if failure.kind is ErrorKind.MALFORMED_BODY:
                self._warnings.warn("zmq", failure.message)
            message = encode(error_reply(failure))
        except asyncio.CancelledError:  # shut down past the grace: still answer
            failure = Failure(ErrorKind.SHUTTING_DOWN, "the service is shutting down", None)
            status = failure.status.grpc.name
            message = encode(error_reply(failure))
        finally:
            labels, seconds = METRIC_LABELS, time.perf_counter() - started
            self.engine.metrics.observe_request(labels.frontend, labels.methods[0], status, seconds)
        if previous is not None:  # the peer's earlier request is answered first
            await asyncio.wait([previous])
        async with self._send_lock:
            await self._socket.send_multipart([*envelope, message])

    async def stop(self, grace: float) -> None:
        """In-flight requests get `grace` (requests arriving meanwhile are refused by the
        draining engine, with a reply); then the socket closes, its queued replies sent."""
        deadline = time.monotonic() + grace
        while self._tasks and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)
        self._receiver.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(self._receiver, *self._tasks, return_exceptions=True)
        self._socket.close(linger=SEND_LINGER_MS)
        await asyncio.to_thread(self._context.term)
