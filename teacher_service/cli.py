"""`teacher-service`: serve a model, or check a server's health."""

from __future__ import annotations

import argparse
import functools
import logging
import socket
import sys
from pathlib import Path

from teacher_service.config import ServerConfig
from teacher_service.flags import add_flags, config_from_args

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
HELP = argparse.ArgumentDefaultsHelpFormatter  # every flag's help shows its default


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    config = config_from_args(parser, ServerConfig, args)  # a bad flag fails before torch loads
    from teacher_service.server import serve

    serve(config)


def _health(args: argparse.Namespace) -> None:
    """One grpc.health.v1 Check: exit 0 only on SERVING, else 1 with the reason on stderr.
    Docker's HEALTHCHECK and compose run this (Docker reserves exit code 2); it imports
    no torch, so probing every few seconds stays cheap."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from teacher_client.auth import grpc_channel_credentials

    if args.tls or args.tls_ca or args.tls_cert:
        credentials = grpc_channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        name = args.tls_server_name
        options = [("grpc.ssl_target_name_override", name)] if name else None
        channel = grpc.secure_channel(args.address, credentials, options)
    else:
        channel = grpc.insecure_channel(args.address)
    service = args.service or "(server)"
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            reason = {
                grpc.StatusCode.UNAVAILABLE: f"cannot reach {args.address}",
                grpc.StatusCode.DEADLINE_EXCEEDED: f"no answer within {args.timeout:g}s",
                grpc.StatusCode.NOT_FOUND: f"the server does not know service {service}",
            }.get(error.code(), "health check failed")
            detail = f"{error.code().name}: {error.details()}" if error.details() else ""
            message = f"teacher-service health: {reason} ({detail or error.code().name})"
            print(message, file=sys.stderr)
            sys.exit(1)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address} {service}: {status}")
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        sys.exit(1)


def free_port() -> int:
    """A loopback port nobody listens on right now (for serve_command's callers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(model_dir: str | Path, port: int, *extra: str) -> list[str]:
    """The argv that starts `teacher-service serve` with this Python, quiet and on CPU
    unless `extra` says otherwise (later flags win): for demos, benchmarks and tests."""
    return [sys.executable, "-m", "teacher_service", "--log-level", "WARNING", "serve",
            "--model", str(model_dir), "--port", str(port), "--device", "cpu", *extra]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """Every flag with its help and default; --log-level before or after the command."""
    parser = argparse.ArgumentParser(
        prog="teacher-service", description=__doc__, formatter_class=HELP
    )
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="logging threshold")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="serve a local Hugging Face causal LM over gRPC", formatter_class=HELP
    )
    add_flags(serve, ServerConfig)
    serve.set_defaults(run=functools.partial(_serve, serve))

    health = commands.add_parser(
        "health",
        help="exit 0 if a server's gRPC health service reports SERVING, else 1",
        formatter_class=HELP,
    )
    port = ServerConfig.__dataclass_fields__["port"].default
    health.add_argument("--address", default=f"127.0.0.1:{port}", help="host:port")
    health.add_argument(
        "--service",
        default="",
        help="the service to ask about: '' is the whole server, "
        "teacher.v1.Teacher the scoring service; both turn NOT_SERVING on SIGTERM",
    )
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")
    health.add_argument("--tls", action="store_true", help="TLS, verified against system roots")
    health.add_argument("--tls-ca", default="", help="TLS: verify the server against this CA")
    health.add_argument("--tls-cert", default="", help="mutual TLS: this client's certificate")
    health.add_argument("--tls-key", default="", help="mutual TLS: its private key")
    health.add_argument(
        "--tls-server-name",
        default="",
        help="the name the server's certificate carries, when --address differs",
    )
    health.set_defaults(run=_health)
    for command in (serve, health):  # after the command too; not given there: the above's
        command.add_argument(
            "--log-level",
            default=argparse.SUPPRESS,
            choices=LOG_LEVELS,
            help="logging threshold (default: INFO)",
        )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"teacher-service: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
