"""One channel to one replica or to a pool of them: targets, load balancing, reconnection."""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from typing import Any

from teacher_client.proto import teacher_pb2 as pb
from teacher_client.retry import RetryPolicy


def channel_options(max_message_bytes: int, retry: RetryPolicy) -> list[tuple[str, Any]]:
    """Message limits, and reconnection paced like the retries: gRPC's own reconnect
    backoff (1 s growing to 120 s) would otherwise fail every retry fast with UNAVAILABLE
    for minutes after a teacher restart."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", int(retry.initial_backoff * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(retry.initial_backoff * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(retry.max_backoff * 1000)),
    ]


TEACHER_SERVICE = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
POOL_SERVICE_CONFIG = json.dumps(
    {
        # spread calls over every replica; skip one whose health check is not SERVING (a
        # replica draining on SIGTERM reports NOT_SERVING before it stops)
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": TEACHER_SERVICE},
    }
)


def channel_target(address: str | Sequence[str]) -> tuple[str, bool]:
    """(gRPC target, is a pool) for one replica or several.

    Several replicas are a list or a comma-separated string of host:port: each host is
    resolved once, here, into gRPC's static `ipv4:`/`ipv6:` list. `dns:///name:port`
    (a Kubernetes headless Service) is a pool gRPC's own resolver keeps up to date.
    """
    endpoints = [address] if isinstance(address, str) else list(address)
    endpoints = [e.strip() for item in endpoints for e in item.split(",") if e.strip()]
    if len(endpoints) == 1:
        return endpoints[0], endpoints[0].startswith("dns:")
    families: dict[str, list[str]] = {"ipv4": [], "ipv6": []}
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"teacher endpoint {endpoint!r}: expected host:port")
        host = host.strip("[]")
        for family, _, _, _, sockaddr in socket.getaddrinfo(host, int(port)):
            if family == socket.AF_INET6:
                families["ipv6"].append(f"[{sockaddr[0]}]:{port}")
            else:
                families["ipv4"].append(f"{sockaddr[0]}:{port}")
    scheme = "ipv4" if families["ipv4"] else "ipv6"
    return f"{scheme}:" + ",".join(dict.fromkeys(families[scheme])), True
