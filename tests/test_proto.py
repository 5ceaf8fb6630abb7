"""The contract: generated code is current; health and reflection answer as standard."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from teacher_service.server import SERVICE_NAME

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current_with_the_proto(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True
    )
    generated = sorted((tmp_path / "teacher_client" / "proto").glob("teacher_pb2*"))
    assert [p.name for p in generated] == [
        "teacher_pb2.py",
        "teacher_pb2.pyi",
        "teacher_pb2_grpc.py",
    ]
    for fresh in generated:
        committed = ROOT / "teacher-client" / "teacher_client" / "proto" / fresh.name
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed} is stale: run `make proto` after editing protos/teacher.proto"
        )


def test_health_service_reports_serving(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services_and_describes_score(server):
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
        descriptor = database.FindFileContainingSymbol(SERVICE_NAME)
        methods = {m.name for s in descriptor.service for m in s.method}
        assert methods == {"Info", "Score", "ScoreStream", "Generate"}
