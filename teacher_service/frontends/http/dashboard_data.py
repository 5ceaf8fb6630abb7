"""The /dashboard page's data: one JSON snapshot of the service's own metrics registry.

Everything is cumulative (as /metrics is) plus the gauges' current values; the page turns
successive snapshots into rates and per-interval percentiles, as Prometheus' rate() and
histogram_quantile() would. Read from the same registry /metrics renders, so the two agree.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry

from teacher_service.metrics import SUCCESS_STATUSES

# the service's own pages and probes: fast, frequent, and not what the latency chart is for
HOUSEKEEPING = frozenset(
    {
        "GET /health",
        "GET /metrics",
        "GET /dashboard",
        "GET /dashboard/data",
        "GET /dashboard/static/{name}",
        "unmatched",
    }
)

Samples = dict[str, list[tuple[dict[str, str], float]]]


def _samples(registry: CollectorRegistry) -> Samples:
    by_name: Samples = defaultdict(list)
    for family in registry.collect():
        for sample in family.samples:
            by_name[sample.name].append((sample.labels, sample.value))
    return by_name


def _total(samples: Samples, name: str) -> float:
    return sum(value for _, value in samples.get(name, ()))


def _finite(value: float) -> float | None:
    """JSON has no infinity: an unbounded gauge (the queue's wait budget) is null."""
    return value if math.isfinite(value) else None


def _mean_parts(samples: Samples, name: str) -> dict[str, float]:
    return {"sum": _total(samples, f"{name}_sum"), "count": _total(samples, f"{name}_count")}


def _answered_latency(samples: Samples) -> dict[str, Any]:
    """teacher_request_seconds' cumulative buckets over answered calls of every front end
    (the last, +Inf, bucket is `count`)."""
    buckets: dict[float, float] = defaultdict(float)
    for labels, value in samples.get("teacher_request_seconds_bucket", ()):
        if labels["status"] in SUCCESS_STATUSES and labels["method"] not in HOUSEKEEPING:
            buckets[float(labels["le"])] += value
    bounds = sorted(le for le in buckets if math.isfinite(le))
    return {
        "le": bounds,
        "counts": [buckets[le] for le in bounds],
        "count": buckets.get(math.inf, 0.0),
    }


def _by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """Totals by one label, leaving out values never counted: metrics.py creates a series
    at 0 for every known label (for Prometheus' rate()); the page draws what happened."""
    totals: dict[str, float] = defaultdict(float)
    for labels, value in samples.get(name, ()):
        totals[labels[label]] += value
    return {key: total for key, total in sorted(totals.items()) if total}


def _requests(samples: Samples) -> list[dict[str, Any]]:
    rows = [
        {**labels, "count": value}
        for labels, value in samples.get("teacher_requests_total", ())
        if value  # the known label sets start at 0: the table lists calls that came
    ]
    return sorted(rows, key=lambda row: (-row["count"], row["frontend"], row["method"]))


def summarize(registry: CollectorRegistry, now: float) -> dict[str, Any]:
    """The snapshot the page polls: `now` is the server's clock (seconds since the epoch)."""
    samples = _samples(registry)

    def gauge(name: str) -> float | None:
        return _finite(_total(samples, name))

    return {
        "time": now,
        "tokens_scored": _total(samples, "teacher_tokens_scored_total"),
        "tokens_computed": _total(samples, "teacher_tokens_computed_total"),
        "sequences_computed": _total(samples, "teacher_sequences_computed_total"),
        "sequences_wasted": _total(samples, "teacher_sequences_wasted_total"),
        "requests_held": _total(samples, "teacher_requests_held_total"),
        "queue_sequences": gauge("teacher_queue_sequences"),
        "queue_wait_estimate_seconds": gauge("teacher_queue_wait_estimate_seconds"),
        "queue_wait_budget_seconds": gauge("teacher_queue_wait_budget_seconds"),
        "forward_budget_tokens": gauge("teacher_forward_budget_tokens"),
        "batch_sequences": _mean_parts(samples, "teacher_batch_sequences"),
        "padding_fraction": _mean_parts(samples, "teacher_batch_padding_fraction"),
        "gc_pause": _mean_parts(samples, "teacher_gc_pause_seconds"),  # every generation
        "latency": _answered_latency(samples),
        "errors": _by_label(samples, "teacher_request_errors_total", "status"),
        "dropped": _by_label(samples, "teacher_sequences_dropped_total", "reason"),
        "requests": _requests(samples),
    }
