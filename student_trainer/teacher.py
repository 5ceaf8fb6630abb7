"""The teacher as the trainer sees it: one small interface, two ways to reach the model.

The loop hands each micro-batch to `submit_score` as soon as it exists and takes the
result when that micro-batch's loss needs it; what the teacher does in between is its own
business, which is the point of the interface (no `isinstance` in the loop):

- `RemoteTeacher`: the teacher service, through teacher_client. Calls run on a thread pool
  of its own, so the service's latency hides behind the student's sampling and forward
  passes (the parameters do not change within a step: nothing goes stale).
- `LocalTeacher`: the same model in this process (teacher_service.in_process, the
  service's one public entry point), for benchmarks and exact, network-free tests. It
  computes when its result is first asked for (see `submit_score` there for why).

Every future records its call's own duration (`ScoreFuture.latency_s`), so the loop can
tell the teacher's time from the time it spent waiting for it: the step metrics
teacher_latency_s, teacher_wait_s and hidden_fraction.

A service that is gone (every replica down) is waited for: each call retries within
teacher.timeout_s, and teacher_client logs that it waits. A call that fails for good
with UNAVAILABLE or DEADLINE_EXCEEDED (`is_outage`) becomes a TeacherOutage: train.py
then writes a checkpoint of the last completed step and stops with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import grpc

from student_trainer.config import ConfigError, TeacherConfig
from teacher_client import (
    GenerateResult,
    RetryPolicy,
    ScoreOptions,
    ScoreResult,
    TeacherClient,
    TeacherInfo,
    TeacherServiceError,
    TokenizerMismatchError,
)
from teacher_client.objectives import Objective
from teacher_service.in_process import InProcessTeacher

log = logging.getLogger(__name__)


# what a teacher call that ran out of teacher.timeout_s fails with: the service was
# unreachable (UNAVAILABLE) or did not answer in time (DEADLINE_EXCEEDED)
OUTAGE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def is_outage(error: BaseException) -> bool:
    """Whether a teacher call failed because the service was out of reach for its whole
    deadline (a resumed run can continue once it is back), not because it refused it."""
    return isinstance(error, TeacherServiceError) and error.code in OUTAGE_CODES


class TeacherOutage(RuntimeError):
    """The teacher service stayed out of reach past teacher.timeout_s. train() raises it
    once it has written a checkpoint of the last completed step (`checkpoint`, `step`);
    the CLI prints it as one line and exits with status 3."""

    def __init__(
        self,
        config: TeacherConfig,
        cause: str,
        waited_s: float | None = None,
        *,
        every_rank: bool = True,
    ) -> None:
        super().__init__(cause)
        self.address = config.address or config.in_process
        self.timeout_s = config.timeout_s
        self.cause = " ".join(cause.split())  # gRPC details may span lines
        self.waited_s = waited_s  # how long the failing call tried, when this rank made it
        # raised by every rank together (so they can all write the checkpoint), not by
        # one rank alone while the others are elsewhere (rank 0's evaluation)
        self.every_rank = every_rank
        self.step: int | None = None  # of the checkpoint written (train.py)
        self.checkpoint: Path | None = None  # where (rank 0 only)

    def __str__(self) -> str:
        waited = "" if self.waited_s is None else f"; the call gave up after {self.waited_s:.1f} s"
        text = (
            f"the teacher service at {self.address} did not answer within teacher.timeout_s "
            f"({self.timeout_s:g} s{waited}): {self.cause}"
        )
        longer = "set teacher.timeout_s higher to wait longer"
        if self.step is None:  # none could be written (see train.py)
            return (
                f"{text}; no checkpoint was written: once the service is back, --resume auto "
                f"continues from the latest one; {longer}"
            )
        if self.checkpoint is None:  # another rank than 0 under torchrun
            return f"{text}; rank 0 wrote a checkpoint of step {self.step}; {longer}"
        return (
            f"{text}; wrote a checkpoint of step {self.step} to {self.checkpoint}. Once the "
            f"service is back, continue with `student-trainer train` with the same --config "
            f"and --set options plus --resume {self.checkpoint} (or --resume auto); {longer}"
        )


class ScoreFuture(Future):
    """The future of one Score call (a list[ScoreResult]) that also knows how long the call
    itself took, `latency_s`: the teacher's time, not the time anyone waited for it."""

    latency_s: float = 0.0

    def run(self, call: Callable[[], list[ScoreResult]]) -> None:
        """Make the call (unless cancelled) and settle the future with its outcome."""
        if not self.set_running_or_notify_cancel():
            return
        started = time.perf_counter()
        try:
            results = call()
        except BaseException as error:  # handed to whoever asks for the result
            self.latency_s = time.perf_counter() - started
            self.set_exception(error)
        else:
            self.latency_s = time.perf_counter() - started
            self.set_result(results)


class Teacher(Protocol):
    """What the trainer needs from a teacher (semantics: docs/design.md)."""

    def check_tokenizer(self, tokenizer: Any) -> TeacherInfo:
        """Raise TokenizerMismatchError unless `tokenizer` assigns ids as the teacher does."""
        ...

    def submit_score(
        self,
        sequences: Sequence[Sequence[int]],
        score_from: Sequence[int],
        options: ScoreOptions,
        *,
        candidates: Sequence[Any] | None = None,
    ) -> ScoreFuture:
        """Start scoring the sequences; the future's result is one ScoreResult each.
        `candidates`: None, or the student's own ids for each sequence's rows."""
        ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[GenerateResult]:
        """The teacher's completions (SeqKD trains on them); the same seed, the same output."""
        ...

    def close(self) -> None: ...


class RemoteTeacher:
    """The teacher service: scoring on `workers` threads, so calls overlap the student."""

    def __init__(self, client: TeacherClient, workers: int = 2) -> None:
        self.client = client
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="teacher")

    def check_tokenizer(self, tokenizer: Any) -> TeacherInfo:
        return self.client.check_tokenizer(tokenizer)

    def submit_score(
        self,
        sequences: Sequence[Sequence[int]],
        score_from: Sequence[int],
        options: ScoreOptions,
        *,
        candidates: Sequence[Any] | None = None,
    ) -> ScoreFuture:
        future = ScoreFuture()
        call = partial(self.client.score, sequences, score_from, options, candidates=candidates)
        self._pool.submit(future.run, call)
        return future

    def generate(self, prompts: Sequence[Sequence[int]], **options: Any) -> list[GenerateResult]:
        return self.client.generate(prompts, **options)

    def close(self) -> None:
        # calls not started yet are dropped (steps built ahead past the last, or after an
        # outage: nobody will ask for them); those under way end by their deadlines
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()


class _Deferred(ScoreFuture):
    """A call made when its result is first asked for, in the asking thread."""

    def __init__(self, call: Callable[[], list[ScoreResult]]) -> None:
        super().__init__()
        self._call = call

    def result(self, timeout: float | None = None) -> list[ScoreResult]:
        if not self.done():
            self.run(self._call)
        return super().result(timeout)


class LocalTeacher:
    """The teacher model in this process, behind the same interface as the service."""

    def __init__(self, teacher: InProcessTeacher) -> None:
        self.teacher = teacher

    @classmethod
    def load(
        cls, model_dir: str | Path, device: str = "cpu", *, deterministic: bool = False
    ) -> LocalTeacher:
        return cls(InProcessTeacher.load(model_dir, device=device, deterministic=deterministic))

    def check_tokenizer(self, tokenizer: Any) -> TeacherInfo:
        return self.teacher.check_tokenizer(tokenizer)

    def submit_score(
        self,
        sequences: Sequence[Sequence[int]],
        score_from: Sequence[int],
        options: ScoreOptions,
        *,
        candidates: Sequence[Any] | None = None,
    ) -> ScoreFuture:
        # Not on a thread: on CPU a second thread would only fight the student for the
        # same cores (and torch called from a second thread slows the first one down for
        # good), so the call waits for its result to be asked for and counts as not
        # hidden at all.
        call = partial(self.teacher.score, sequences, score_from, options, candidates=candidates)
        return _Deferred(call)

    def generate(self, prompts: Sequence[Sequence[int]], **options: Any) -> list[GenerateResult]:
        return self.teacher.generate(prompts, **options)

    def close(self) -> None:
        """Nothing to release: the model goes with this object."""


def connect(config: TeacherConfig, *, required: bool, workers: int = 2) -> Teacher | None:
    """The teacher section's teacher: in-process when teacher.in_process names a model
    directory, else the service at teacher.address, once it reports SERVING (up to
    teacher.connect_timeout_s). None when not `required` (the method needs none: sft)
    and none is named."""
    if config.in_process:
        return LocalTeacher.load(config.in_process, deterministic=config.deterministic)
    if not (required or config.address):
        return None
    tls = dict(
        tls=config.tls, tls_ca=config.tls_ca, tls_cert=config.tls_cert, tls_key=config.tls_key
    )
    # retried within teacher.timeout_s, however many tries that takes: a trainer waits out
    # a teacher's restart or overload (the same request, the same answer) rather than die
    retry = RetryPolicy(max_retries=None)
    client = TeacherClient(config.address, timeout=config.timeout_s, retry=retry, **tls)
    log.info("waiting for the teacher service at %s", config.address)
    try:
        client.wait_until_serving(timeout=config.connect_timeout_s)
    except (TeacherServiceError, TimeoutError) as error:
        client.close()
        raise ConfigError(
            f"teacher.address: no teacher service serving at {config.address} within "
            f"{config.connect_timeout_s:g} s (teacher.connect_timeout_s): {error}"
        ) from None
    return RemoteTeacher(client, workers)


def handshake(
    teacher: Teacher, tokenizer: Any, config: TeacherConfig, objective: Objective
) -> None:
    """Refuse (and close) a teacher whose vocabulary differs from the student's: its
    log-probs would mean other tokens. Also refuse a top_k beyond its vocabulary, when the
    objective asks for a top-k."""
    try:
        info = teacher.check_tokenizer(tokenizer)
    except TokenizerMismatchError as error:
        teacher.close()
        key = "teacher.in_process" if config.in_process else "teacher.address"
        raise ConfigError(f"{key}: {error}") from None
    top_k = objective.top_k
    if objective.support == "topk" and top_k > info.vocab_size:
        teacher.close()
        raise ConfigError(
            f"method.top_k: {top_k} exceeds the teacher's vocabulary ({info.vocab_size} tokens)"
        )
