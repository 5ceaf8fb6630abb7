"""Prometheus metrics of one service instance (served at GET /metrics).

Each ServiceMetrics has its own registry, so several services in one process (tests,
benchmarks) never share counters.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FRACTION_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


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
            "Time from receiving a request to answering it",
            ["frontend", "method"],
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
        self.padding_waste = Histogram(
            "teacher_batch_padding_fraction",
            "Padded positions / all positions of a forward",
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

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def observe_batch(
        self, sizes: list[int], queue_waits: list[float], forward_seconds: float
    ) -> None:
        """Called by the batcher after every forward pass (sizes: tokens per sequence)."""
        padded = max(sizes) * len(sizes)
        self.batch_size.observe(len(sizes))
        self.padding_waste.observe(1 - sum(sizes) / padded)
        self.forward_seconds.observe(forward_seconds)
        for wait in queue_waits:
            self.queue_wait.observe(wait)

    def observe_request(self, frontend: str, method: str, status: str, seconds: float) -> None:
        self.requests.labels(frontend, method, status).inc()
        self.request_seconds.labels(frontend, method).observe(seconds)
        if status not in ("OK", "200"):
            self.errors.labels(frontend, method, status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
