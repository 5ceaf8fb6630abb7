"""A fresh service's /metrics already holds every labelled counter's series, at 0, for each
label value the code can report: a dashboard's rate() over them reads 0, not "no data".

The expected label values are computed here from the specifications they follow: the gRPC
methods from protos/teacher.proto, the HTTP routes from the running app's /openapi.json,
the statuses from the error table (plus gRPC's CANCELLED and HTTP's 401 for a bad token).
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from teacher_service.cli import free_port
from teacher_service.errors import STATUS
from tests.conftest import start_background_server

PROTO = Path(__file__).resolve().parents[1] / "protos" / "teacher.proto"


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted labels: value} of one sample name in an exposition."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def series(frontend: str, methods: list[str], statuses: set[str]) -> set[tuple]:
    return {
        (("frontend", frontend), ("method", method), ("status", status))
        for method in methods
        for status in statuses
    }


@pytest.fixture(scope="module")
def fresh_service(tiny_model_dir, backend):
    running = start_background_server(
        tiny_model_dir, backend, http_port=0, zmq_port=free_port(), max_wait_ms=2.0
    )
    try:
        with httpx.Client(base_url=running.http_url, timeout=60) as http:
            exposition = http.get("/metrics").text  # before any other request
            openapi = http.get("/openapi.json").json()
        yield exposition, openapi
    finally:
        running.stop()


def test_request_and_error_counters_start_at_zero_for_every_known_label(fresh_service):
    exposition, openapi = fresh_service
    grpc_methods = re.findall(r"^\s*rpc (\w+)\(", PROTO.read_text(), re.M)
    assert {"Info", "Score", "ScoreStream", "Generate"} <= set(grpc_methods)
    http_methods = [
        f"{verb.upper()} {path}" for path, ops in openapi["paths"].items() for verb in ops
    ]
    assert "POST /v1/score" in http_methods and "GET /metrics" in http_methods
    grpc_failures = {s.grpc.name for s in STATUS.values()} | {"CANCELLED"}
    http_failures = {str(s.http) for s in STATUS.values()} | {"401"}
    assert {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"} <= grpc_failures
    assert {"429", "504"} <= http_failures

    errors = (
        series("grpc", grpc_methods, grpc_failures)
        | series("zmq", ["GKD"], grpc_failures)
        | series("http", http_methods, http_failures)
    )
    requests = (
        errors
        | series("grpc", grpc_methods, {"OK"})
        | series("zmq", ["GKD"], {"OK"})
        | series("http", http_methods, {"200"})
    )
    assert samples(exposition, "teacher_requests_total") == dict.fromkeys(requests, 0.0)
    assert samples(exposition, "teacher_request_errors_total") == dict.fromkeys(errors, 0.0)


def test_drop_and_gc_series_exist_before_the_first_drop_or_collection(fresh_service):
    exposition, _ = fresh_service
    dropped = samples(exposition, "teacher_sequences_dropped_total")
    assert dropped == {(("reason", "cancelled"),): 0.0, (("reason", "expired"),): 0.0}
    pause_counts = samples(exposition, "teacher_gc_pause_seconds_count")
    assert {labels[0][1] for labels in pause_counts} == {"0", "1", "2"}
