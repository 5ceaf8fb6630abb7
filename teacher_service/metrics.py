"""Prometheus metrics of one service instance (served at GET /metrics).

Each ServiceMetrics has its own registry, so several services in one process (tests,
benchmarks) never share counters. Every labelled counter has a series at 0 for each label
value the code can report, from the start (the front ends declare theirs: FrontEndLabels):
`rate()` of a counter that never moved is 0 on a dashboard, not "no data".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from teacher_service.batcher import DropReason
from teacher_service.heap import GENERATIONS

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FRACTION_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SUCCESS_STATUSES = ("OK", "200")  # gRPC's and HTTP's; any other status is an error


@dataclass(frozen=True)
class FrontEndLabels:
    """What one front end reports to the request counters: its methods, each answered with
    `success` or one of `failures`."""

    frontend: str
    methods: tuple[str, ...]
    success: str
    failures: tuple[str, ...]


class Queue(Protocol):
    """What the queue gauges read (batcher.DynamicBatcher)."""

    @property
    def pending(self) -> int: ...

    def estimated_wait(self) -> float: ...

    def forward_budget(self) -> int: ...

    def queue_budget(self) -> float | None: ...


def _or_inf(value: float | None) -> float:
    return float("inf") if value is None else value


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "teacher_requests",
            "Requests answered, by front end, method and status",
            ["frontend", "method", "status"],
            registry=r,
        )
        self.errors = Counter(
            "teacher_request_errors",
            "Requests that ended in an error, by front end, method and status",
            ["frontend", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "teacher_request_seconds",
            "Time from receiving a request to answering it, by status (a refusal's time is "
            "not an answer's)",
            ["frontend", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_scored = Counter(
            "teacher_tokens_scored", "Positions scored (rows returned)", registry=r
        )
        self.batch_size = Histogram(
            "teacher_batch_sequences",
            "Sequences per forward pass",
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.tokens_computed = Counter(
            "teacher_tokens_computed",
            "Positions the model's forwards ran: padding included, a shared prefix once "
            "(local backends only)",
            registry=r,
        )
        self.padding_waste = Histogram(
            "teacher_batch_padding_fraction",
            "Padding positions / all positions a forward ran (local backends only)",
            buckets=FRACTION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "teacher_queue_wait_seconds",
            "Time a sequence waited in the batcher's queue",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "teacher_forward_seconds",
            "Time of one batched forward pass and its scoring",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "teacher_queue_sequences", "Sequences waiting for a forward pass", registry=r
        )
        self.queue_wait_estimate = Gauge(
            "teacher_queue_wait_estimate_seconds",
            "The queue's estimated wait, which admission compares with "
            "teacher_queue_wait_budget_seconds",
            registry=r,
        )
        self.queue_wait_budget = Gauge(
            "teacher_queue_wait_budget_seconds",
            "The longest wait admission lets a request take: max_queue_forwards forwards of "
            "teacher_forward_budget_tokens at the measured rate (+Inf: no bound yet)",
            registry=r,
        )
        self.forward_budget = Gauge(
            "teacher_forward_budget_tokens",
            "Padded tokens the next forward may hold: the model's efficient batch or 4 mean "
            "requests, at most max_batch_tokens",
            registry=r,
        )
        self.computed = Counter(
            "teacher_sequences_computed", "Sequences run through a forward pass", registry=r
        )
        self.wasted = Counter(
            "teacher_sequences_wasted",
            "Sequences computed whose caller had left (cancelled, deadline) before the end",
            registry=r,
        )
        self.dropped = Counter(
            "teacher_sequences_dropped",
            "Sequences dropped before a forward: reason=cancelled (the caller left) or "
            "expired (its deadline passed, or would have before the forward ended)",
            ["reason"],
            registry=r,
        )
        self.held = Counter(
            "teacher_requests_held",
            "Requests held until the return their caller's last refusal booked (a caller that "
            "came back before its retry hint), then admitted or refused as any other",
            registry=r,
        )

        self.gc_pause = Histogram(
            "teacher_gc_pause_seconds",
            "Garbage collections of the serving process, by generation: no thread runs "
            "Python meanwhile, the event loop that answers calls included (heap.py)",
            ["generation"],
            buckets=PAUSE_BUCKETS,
            registry=r,
        )
        self.gc_frozen = Gauge(
            "teacher_gc_frozen_objects",
            "Objects that start-up left, kept out of every garbage collection (heap.freeze)",
            registry=r,
        )
        for reason in DropReason:
            self.dropped.labels(reason.value)
        for generation in GENERATIONS:
            self.gc_pause.labels(generation)

    def expect_requests(self, labels: FrontEndLabels) -> None:
        """Create the front end's request and error series at 0 (called as it starts)."""
        for method in labels.methods:
            self.requests.labels(labels.frontend, method, labels.success)
            for status in labels.failures:
                self.requests.labels(labels.frontend, method, status)
                self.errors.labels(labels.frontend, method, status)

    def track_queue(self, queue: Queue) -> None:
        self.queue_depth.set_function(lambda: queue.pending)
        self.queue_wait_estimate.set_function(queue.estimated_wait)
        self.forward_budget.set_function(queue.forward_budget)
        self.queue_wait_budget.set_function(lambda: _or_inf(queue.queue_budget()))

    def observe_dropped(self, reason: DropReason, count: int) -> None:
        self.dropped.labels(reason.value).inc(count)

    def observe_held(self) -> None:
        self.held.inc()

    def observe_batch(
        self, sizes: list[int], queue_waits: list[float], forward_seconds: float, wasted: int
    ) -> None:
        """Called by the batcher after every forward pass (sizes: tokens per sequence)."""
        self.computed.inc(len(sizes))
        self.wasted.inc(wasted)
        self.batch_size.observe(len(sizes))
        self.forward_seconds.observe(forward_seconds)
        for wait in queue_waits:
            self.queue_wait.observe(wait)

    def observe_forward_tokens(self, computed: int, padding: int) -> None:
        """Called on the model worker after every local batch, its forwards together
        (backend_api.ForwardTokens: padding included, a shared prefix once), so packing and
        sharing show here."""
        self.tokens_computed.inc(computed)
        if computed:
            self.padding_waste.observe(padding / computed)

    def observe_gc_pause(self, generation: str, seconds: float) -> None:
        self.gc_pause.labels(generation).observe(seconds)

    def observe_request(self, frontend: str, method: str, status: str, seconds: float) -> None:
        self.requests.labels(frontend, method, status).inc()
        self.request_seconds.labels(frontend, method, status).observe(seconds)
        if status not in SUCCESS_STATUSES:
            self.errors.labels(frontend, method, status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
