"""/dashboard/data's snapshot against what the same registry renders at /metrics."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from teacher_service.batcher import DropReason
from teacher_service.frontends.http.dashboard_data import summarize
from teacher_service.metrics import LATENCY_BUCKETS, ServiceMetrics


class FixedQueue:
    """A queue whose gauges read constants; no wait bound yet (queue_budget None)."""

    pending = 3

    def estimated_wait(self) -> float:
        return 0.25

    def forward_budget(self) -> int:
        return 512

    def queue_budget(self) -> float | None:
        return None


def parsed(metrics: ServiceMetrics) -> dict[tuple[str, frozenset], float]:
    """Independent reading: /metrics' text through prometheus_client's own parser."""
    text = metrics.render().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def observed() -> ServiceMetrics:
    metrics = ServiceMetrics()
    metrics.track_queue(FixedQueue())
    for seconds in (0.003, 0.004, 0.02, 0.2, 7.0):
        metrics.observe_request("http", "POST /v1/score", "200", seconds)
    metrics.observe_request("grpc", "/teacher.v1.Teacher/Score", "OK", 0.04)
    metrics.observe_request("grpc", "/teacher.v1.Teacher/Score", "RESOURCE_EXHAUSTED", 0.001)
    for _ in range(2):
        metrics.observe_request("http", "POST /v1/score", "429", 0.0005)
    metrics.observe_request("http", "GET /metrics", "200", 0.0001)  # housekeeping
    metrics.observe_request("http", "GET /dashboard/data", "200", 0.0001)  # likewise
    metrics.tokens_scored.inc(120)
    metrics.observe_batch([5, 9, 9], [0.001, 0.002, 0.003], 0.05, wasted=1)
    metrics.observe_batch([30], [0.004], 0.07, wasted=0)
    metrics.observe_forward_tokens(computed=40, padding=10)
    metrics.observe_forward_tokens(computed=30, padding=0)
    metrics.observe_dropped(DropReason.EXPIRED, 4)
    metrics.observe_gc_pause("2", 0.125)
    metrics.observe_gc_pause("0", 0.001)
    return metrics


def test_totals_gauges_and_means_equal_the_rendered_metrics():
    metrics = observed()
    got, text = summarize(metrics.registry, now=123.5), parsed(metrics)
    none = frozenset()
    assert got["time"] == 123.5
    assert got["tokens_scored"] == text[("teacher_tokens_scored_total", none)] == 120
    assert got["tokens_computed"] == text[("teacher_tokens_computed_total", none)] == 70
    assert got["sequences_computed"] == text[("teacher_sequences_computed_total", none)] == 4
    assert got["sequences_wasted"] == 1
    assert got["queue_sequences"] == 3
    assert got["queue_wait_estimate_seconds"] == 0.25
    assert got["forward_budget_tokens"] == 512
    assert got["queue_wait_budget_seconds"] is None  # +Inf at /metrics: JSON has no infinity
    assert text[("teacher_queue_wait_budget_seconds", none)] == float("inf")
    assert got["batch_sequences"] == {"sum": 4, "count": 2}  # 3 sequences, then 1
    assert got["padding_fraction"] == {"sum": 0.25, "count": 2}  # 10/40, then 0/30
    assert got["gc_pause"] == {"sum": pytest.approx(0.126), "count": 2}  # both generations
    assert got["dropped"] == {"expired": 4}  # "cancelled" is a series at 0: not drawn


def test_errors_by_status_and_the_requests_table():
    got, text = summarize(observed().registry, now=0.0), parsed(observed())
    assert got["errors"] == {"429": 2, "RESOURCE_EXHAUSTED": 1}
    rows = {(r["frontend"], r["method"], r["status"]): r["count"] for r in got["requests"]}
    rendered = {
        (labels["frontend"], labels["method"], labels["status"]): value
        for (name, labels_set), value in text.items()
        if name == "teacher_requests_total"
        for labels in [dict(labels_set)]
    }
    assert rows == rendered
    assert rows[("http", "POST /v1/score", "200")] == 5
    counts = [row["count"] for row in got["requests"]]
    assert counts == sorted(counts, reverse=True)


def test_latency_is_answered_calls_only_without_housekeeping():
    got = summarize(observed().registry, now=0.0)["latency"]
    answered = [0.003, 0.004, 0.02, 0.2, 7.0, 0.04]  # the 200s and the gRPC OK
    assert got["le"] == list(LATENCY_BUCKETS)
    assert got["counts"] == [sum(s <= le for s in answered) for le in LATENCY_BUCKETS]
    assert got["count"] == len(answered)


def test_an_idle_service_has_no_latency_buckets_and_zero_totals():
    got = summarize(ServiceMetrics().registry, now=0.0)
    assert got["latency"] == {"le": [], "counts": [], "count": 0.0}
    assert got["tokens_scored"] == 0 and got["requests"] == [] and got["errors"] == {}
    assert got["queue_sequences"] == 0  # no queue tracked: the gauge's initial value
