"""What every front end shares: one backend, one model worker, one dynamic batcher.

The gRPC servicer and the HTTP routes (native, vLLM/OpenAI and TGI dialects) all turn
their requests into the plain requests of requests.py and call the engine, so
validation, batching and error semantics are the same whichever door a request uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import Iterator

import torch

from causal_lm.sampling import Completion, SamplingOptions, chunk_prompts, new_generator
from teacher_client import TeacherInfo
from teacher_service.backend_api import Backend, Capability, ScoreItem, describe
from teacher_service.batcher import (
    BatcherClosed,
    DeadlineExceeded,
    DropReason,
    DynamicBatcher,
    ModelWorker,
)
from teacher_service.capacity import warm_up
from teacher_service.config import ServerConfig
from teacher_service.deadlines import caller_deadline, caller_peer
from teacher_service.errors import Unsupported
from teacher_service.metrics import ServiceMetrics
from teacher_service.requests import GenerateRequest, ScoreRequest
from teacher_service.scoring import ScoreOptions, SequenceScores
from teacher_service.validation import ModelLimits, parse_generate_request, parse_score_request

WARM_UP_SEQUENCE_TOKENS = 512  # a trainer's prompt + completion, about


class Engine:
    def __init__(self, backend: Backend, config: ServerConfig) -> None:
        self.backend = backend
        self.config = config
        self.limits = ModelLimits(backend.vocab_size, backend.max_seq_len, config.limits)
        self.metrics = ServiceMetrics()
        self.worker = ModelWorker(nice=config.worker_nice)
        self.batcher: DynamicBatcher[ScoreItem, SequenceScores] = DynamicBatcher(
            self._score_batch,
            self.worker,
            length=lambda item: item.forward_len,
            max_batch_tokens=config.limits.max_batch_tokens,
            max_wait_ms=config.max_wait_ms,
            max_queued_tokens=config.limits.max_queued_tokens,
            max_queue_forwards=config.limits.max_queue_forwards,
            observer=self.metrics,
        )
        self.metrics.track_queue(self.batcher)
        self.draining = False
        self._calls = 0  # score / generate calls in progress, from every front end
        self._idle = asyncio.Event()
        self._idle.set()

    def _score_batch(self, items: list[ScoreItem]) -> list[SequenceScores]:
        """The backend's score_batch (on the model worker); what its forwards ran goes to
        /metrics (nothing for an upstream's, which it does not see)."""
        scored = self.backend.score_batch(items)
        ran = scored.forward_tokens
        if ran is not None:
            self.metrics.observe_forward_tokens(ran.computed, ran.padding)
        return scored.scores

    def start(self) -> None:
        """Start the batcher's loop (call from the event loop that will serve requests)."""
        self.batcher.start()

    async def warm_up(self) -> None:
        """Time forwards of the configured shape before the first request (capacity.py):
        sequences of WARM_UP_SEQUENCE_TOKENS (or the model's limit), one and then twice as
        many, up to max_batch_tokens, every row scored with top-k 64. A remote backend's
        upstream is measured by the first real calls instead."""
        if not (self.config.warm_up and self.backend.samples_while_scoring):
            return
        budget = self.config.limits.max_batch_tokens
        length = min(WARM_UP_SEQUENCE_TOKENS, self.backend.max_seq_len, budget + 1)
        generator = torch.Generator().manual_seed(0)
        options = ScoreOptions(top_k=min(64, self.backend.vocab_size))

        def run(tokens: int) -> int:  # on the worker
            items = [  # random ids: no shared prefix, nothing packed
                ScoreItem(
                    torch.randint(self.backend.vocab_size, (length,), generator=generator),
                    1,
                    options,
                )
                for _ in range(max(1, tokens // (length - 1)))
            ]
            self.backend.score_batch(items)
            return sum(item.forward_len for item in items)

        await self.worker.run(warm_up, self.batcher.capacity, run, length - 1, budget)

    def drain(self) -> None:
        """Shutdown begins: new calls are refused (SHUTTING_DOWN), in-flight ones go on."""
        self.draining = True
        self.batcher.stop_admitting()

    async def close(self) -> None:
        """Fail whatever is still in flight with SHUTTING_DOWN, without waiting for the
        forward on the worker (worker.join waits for it, off the event loop)."""
        self.draining = True
        await self.batcher.close()
        self.worker.close(wait=False)

    async def idle(self) -> None:
        """Return once no score or generate call is in progress (at once if none is)."""
        await self._idle.wait()

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        self._calls += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._calls -= 1
            if not self._calls:
                self._idle.set()

    def info(self) -> TeacherInfo:
        return describe(self.backend, self.config.limits)

    async def score(self, request: ScoreRequest) -> list[SequenceScores]:
        """Validate and score. With `sample_next`, sequence n's next token is drawn from its
        own generator, seeded seed + n, so it does not depend on what it is batched with."""
        with self._call():
            return await self._score(request)

    async def _score(self, request: ScoreRequest) -> list[SequenceScores]:
        self._refuse_if_draining()
        deadline = caller_deadline()
        self._require_capabilities(request)
        items = parse_score_request(request, self.limits)
        sample_next = request.sample_next
        if sample_next is not None:
            if not self.backend.samples_while_scoring:
                raise Unsupported(f"the {self.backend.name} backend cannot sample while scoring")
            for n, item in enumerate(items):
                seeded = SamplingOptions(
                    1, sample_next.temperature, sample_next.top_p, (sample_next.seed + n) % 2**64
                )
                item.sample_next = (seeded, new_generator(seeded, self.backend.device))
        results = await self.batcher.submit(items, deadline=deadline, caller=caller(items))
        self.metrics.tokens_scored.inc(sum(int(r.target_logprobs.numel()) for r in results))
        return results

    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise BatcherClosed("the service is shutting down")

    def _require_capabilities(self, request: ScoreRequest) -> None:
        """Refuse, naming the capability, what this backend cannot compute (remote ones)."""
        candidates = f"{request.names.sequences}[]{request.names.candidate_ids}"
        needed = {  # capability: (what asks for it, its field, asked)
            Capability.TOPK: ("top_k", "top_k", request.top_k > 0),
            Capability.FULL: ("full", "full", request.full),
            Capability.CANDIDATES: (
                candidates,
                candidates,
                any(s.candidate_ids is not None for s in request.sequences),
            ),
            Capability.RANKS: ("the actual token's rank", None, request.ranks),
            Capability.TEMPERATURE: (
                "temperature",
                "temperature",
                request.temperature is not None and request.temperature != 1.0,
            ),
        }
        have = set(self.backend.capabilities)
        for capability, (what, field, asked) in needed.items():
            if asked and capability not in have:
                offered = ", ".join(sorted(c.value for c in have))
                raise Unsupported(
                    f"{what}: the {self.backend.name} backend cannot provide the "
                    f"'{capability.value}' capability (it has: {offered})",
                    field=field,
                )

    async def generate(self, request: GenerateRequest) -> list[Completion]:
        """Complete each prompt: consecutive chunks of prompts within max_batch_tokens, one
        after another on the model worker (between score batches). The caller's deadline is
        checked before each chunk and bounds the wait for the one running: once the caller
        has gone (deadline, cancel) no chunk starts, one already on the worker finishes there
        for nobody, and the prompts never started count as dropped, as the batcher counts
        its sequences (DeadlineExceeded; teacher_sequences_dropped_total{reason})."""
        with self._call():
            return await self._generate(request)

    async def _generate(self, request: GenerateRequest) -> list[Completion]:
        self._refuse_if_draining()
        deadline = caller_deadline()
        if Capability.GENERATE not in self.backend.capabilities:
            raise Unsupported(f"Generate: the {self.backend.name} backend cannot generate")
        prompts, options = parse_generate_request(request, self.limits)
        local = self.backend.samples_while_scoring  # else the upstream draws, from the seed
        generator = new_generator(options, self.backend.device) if local else None
        completions: list[Completion] = []
        budget = self.config.limits.max_batch_tokens
        progress = _Progress()

        def run(chunk: list[list[int]]) -> list[Completion] | None:  # on the worker
            if not progress.start(len(chunk)):
                return None
            return self.backend.generate(chunk, options, generator)

        loop = asyncio.get_running_loop()
        try:
            for chunk in chunk_prompts(prompts, options.max_new_tokens, budget):
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    raise asyncio.TimeoutError
                completions += await asyncio.wait_for(self.worker.run(run, chunk), left)
        except BaseException as error:
            unstarted = len(prompts) - progress.leave()
            # asyncio's own TimeoutError: the builtin one only from Python 3.11
            timed_out = isinstance(error, asyncio.TimeoutError)
            if timed_out or isinstance(error, asyncio.CancelledError):
                expired = timed_out or (deadline is not None and loop.time() >= deadline)
                if unstarted:
                    reason = DropReason.EXPIRED if expired else DropReason.CANCELLED
                    self.metrics.observe_dropped(reason, unstarted)
            if timed_out:
                raise DeadlineExceeded(
                    f"the caller's deadline passed after {len(completions)} of {len(prompts)} "
                    "prompts were generated"
                ) from None
            raise
        return completions


def caller(items: list[ScoreItem]) -> tuple[str, str] | None:
    """Who asks, for the batcher's turns: the caller's connection and a digest of what it
    asks, the same for a request and its resends (None for an in-process caller)."""
    peer = caller_peer()
    if peer is None:
        return None
    digest = hashlib.blake2b(digest_size=12)
    for item in items:
        digest.update(item.score_from.to_bytes(4, "little"))
        digest.update(item.token_ids.numpy().tobytes())
    return peer, digest.hexdigest()


class _Progress:
    """Generate's prompts begun on the worker; once the caller has left, none begins, so
    each is either generated or counted as dropped, never both."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left = False
        self._started = 0

    def start(self, prompts: int) -> bool:
        """On the worker, before a chunk: False once the caller has left."""
        with self._lock:
            if not self._left:
                self._started += prompts
            return not self._left

    def leave(self) -> int:
        """The caller has left: how many prompts were begun."""
        with self._lock:
            self._left = True
            return self._started
