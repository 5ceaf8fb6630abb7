"""`teacher-service`: serve a model, or check a server's health."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from teacher_service.auth import TOKEN_ENV, read_token
from teacher_service.config import Limits, ServerConfig


def _serve(args: argparse.Namespace) -> None:
    from teacher_service.server import serve

    limits = Limits(
        max_batch_tokens=args.max_batch_tokens,
        max_tokens_per_request=args.max_tokens_per_request,
        max_sequences_per_request=args.max_sequences_per_request,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        max_queued_tokens=args.max_queued_tokens,
        max_queue_forwards=args.max_queue_forwards,
    )
    config = ServerConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        device_map=args.device_map or "",
        dtype=args.dtype,
        score_chunk_mb=args.score_chunk_mb,
        share_prefixes=not args.no_share_prefixes,
        pack=not args.no_packing,
        full_logits=args.full_logits,
        max_wait_ms=args.max_wait_ms,
        worker_nice=args.worker_nice,
        freeze_heap=not args.no_freeze_heap,
        threads=args.threads,
        warm_up=not args.no_warm_up,
        limits=limits,
        grace_seconds=args.grace_seconds,
        max_connection_age_s=args.max_connection_age_s,
        grpc=not args.no_grpc,
        grpc_max_concurrent_rpcs=args.grpc_max_concurrent_rpcs,
        backend=args.backend,
        upstream=args.upstream or "",
        http_port=args.http_port,
        http_header_timeout_s=args.http_header_timeout_s,
        http_body_timeout_s=args.http_body_timeout_s,
        http_max_connections=args.http_max_connections,
        auth_token=read_token(args.auth_token_file),
        tls_cert=args.tls_cert or "",
        tls_key=args.tls_key or "",
        tls_client_ca=args.tls_client_ca or "",
        zmq_port=args.zmq_port,
        zmq_host=args.zmq_host,
        zmq_top_k=args.zmq_top_k,
    )
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
    parser = argparse.ArgumentParser(prog="teacher-service", description=__doc__)
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a local Hugging Face causal LM over gRPC")
    defaults, limits = ServerConfig(model=""), Limits()
    serve.add_argument(
        "--model", required=True, help="local model directory (config.json, weights, tokenizer)"
    )
    serve.add_argument(
        "--host", default=defaults.host, help="address to listen on (0.0.0.0 for all)"
    )
    serve.add_argument(
        "--port", type=int, default=defaults.port, help="gRPC port (0 picks a free port)"
    )
    serve.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="also serve HTTP here (native API, vLLM/OpenAI and TGI dialects, /metrics)",
    )
    serve.add_argument(
        "--http-header-timeout-s",
        type=float,
        default=defaults.http_header_timeout_s,
        help="HTTP: a request line and headers must arrive within this long of the connection "
        "opening (or the request's first byte), else 408 and the connection is closed",
    )
    serve.add_argument(
        "--http-body-timeout-s",
        type=float,
        default=defaults.http_body_timeout_s,
        help="HTTP: a request body must arrive within this long of its headers, else 408 and "
        "the connection is closed",
    )
    serve.add_argument(
        "--http-max-connections",
        type=int,
        default=defaults.http_max_connections,
        help="HTTP: open connections served at once; a request on one past the cap gets 503 "
        "and its connection is closed",
    )
    serve.add_argument("--no-grpc", action="store_true", help="no gRPC front end")
    serve.add_argument(
        "--grpc-max-concurrent-rpcs",
        type=int,
        default=defaults.grpc_max_concurrent_rpcs,
        help="gRPC: calls in progress at once (a stream counts as one for its whole life, "
        "health checks count too); a call past the cap gets RESOURCE_EXHAUSTED at once",
    )
    serve.add_argument(
        "--zmq-port",
        type=int,
        default=defaults.zmq_port,
        help="also serve verl's GKD teacher protocol (ZeroMQ ROUTER, torch.save payloads) "
        "here; 0 = off. No auth, no TLS: it listens on --zmq-host",
    )
    serve.add_argument(
        "--zmq-host",
        default=defaults.zmq_host,
        help="address the ZeroMQ front end listens on (loopback by default, whatever --host "
        "says; must stay loopback when auth or TLS is on)",
    )
    serve.add_argument(
        "--zmq-top-k",
        type=int,
        default=defaults.zmq_top_k,
        help="top-k log-probs per row for verl requests that name none (verl's teacher "
        "server: --n-logprobs); at most the vocabulary",
    )
    serve.add_argument(
        "--auth-token-file",
        help="require this file's token as 'Authorization: Bearer <token>' on both front "
        f"ends (health checks stay open); default: ${TOKEN_ENV} if set, else no auth",
    )
    serve.add_argument("--tls-cert", help="PEM certificate chain: serve TLS on both front ends")
    serve.add_argument("--tls-key", help="the certificate's PEM private key")
    serve.add_argument(
        "--tls-client-ca", help="mutual TLS: require client certificates signed by this CA"
    )
    serve.add_argument(
        "--backend",
        default="huggingface",
        choices=["huggingface", "openai", "tgi"],
        help="huggingface: the model in --model; openai / tgi: front the --upstream server "
        "(a vLLM/SGLang or TGI endpoint; --model is then its tokenizer's directory)",
    )
    serve.add_argument("--upstream", help="the upstream server's URL, e.g. http://vllm:8000")
    serve.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    serve.add_argument(
        "--device-map",
        help="a teacher larger than one GPU: accelerate places its layers across the node's "
        "GPUs (auto, balanced, sequential) or as a JSON file of module name -> device says "
        "(a GPU index, cuda:N, cpu, disk); one GPU computes at a time. Not with --device",
    )
    serve.add_argument(
        "--dtype", default=defaults.dtype, choices=["float32", "float16", "bfloat16"]
    )
    serve.add_argument(
        "--score-chunk-mb",
        type=int,
        default=defaults.score_chunk_mb,
        help="MiB of float32 logits computed at once: the output layer runs on the scored "
        "rows only, this many at a time (peak memory is a few times this)",
    )
    serve.add_argument(
        "--no-share-prefixes",
        action="store_true",
        help="run every sequence whole, even when several of a batch share a prefix",
    )
    serve.add_argument(
        "--no-packing",
        action="store_true",
        help="pad every unshared sequence to the batch's longest instead of packing several "
        "short ones into one row",
    )
    serve.add_argument(
        "--full-logits",
        action="store_true",
        help="apply the output layer to every position, model(...).logits (slower; for "
        "comparison: the default scores only the asked rows)",
    )
    serve.add_argument(
        "--max-batch-tokens",
        type=int,
        default=limits.max_batch_tokens,
        help="padded tokens per forward pass (rows x longest)",
    )
    serve.add_argument(
        "--max-wait-ms",
        type=float,
        default=defaults.max_wait_ms,
        help="how long a queued sequence may wait for others to batch with",
    )
    serve.add_argument(
        "--worker-nice",
        type=int,
        default=defaults.worker_nice,
        help="run the model worker thread this much nicer than the rest of the process "
        "(Linux, 0-19), so the front door's threads preempt a running forward and answer "
        "or refuse calls on time under load; 0 when the service shares its cores with a "
        "process that must not outrank it",
    )
    serve.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="torch's and the tokenizers' threads; 0 (default): $TEACHER_THREADS, else "
        "$OMP_NUM_THREADS, else the CPUs the affinity mask and the cgroup CPU quota allow",
    )
    serve.add_argument(
        "--no-freeze-heap",
        action="store_true",
        help="leave start-up's objects in the garbage collector's full passes (by default "
        "they are frozen out: each pass over them stops every thread for 100 ms or more)",
    )
    serve.add_argument("--max-tokens-per-request", type=int, default=limits.max_tokens_per_request)
    serve.add_argument(
        "--max-queue-forwards",
        type=float,
        default=limits.max_queue_forwards,
        help="admission: a request is refused at once (RESOURCE_EXHAUSTED / HTTP 429, with a "
        "retry-after hint) while the work ahead of it would take more than this many "
        "forwards, at the model's measured speed; a forward holds the model's efficient "
        "batch or 4 requests of the recent mean size (at most --max-batch-tokens); inf: off",
    )
    serve.add_argument(
        "--no-warm-up",
        action="store_true",
        help="serve without timing forwards first (by default forwards of growing size, up to "
        "--max-batch-tokens, measure the model before the first request, so admission and "
        "forward sizing start from its real speed)",
    )
    serve.add_argument(
        "--max-queued-tokens",
        type=int,
        default=limits.max_queued_tokens,
        help="a hard cap on the tokens waiting in the batcher, whatever the estimate says "
        "(beyond it requests are refused like --max-queue-forwards)",
    )
    serve.add_argument(
        "--max-sequences-per-request", type=int, default=limits.max_sequences_per_request
    )
    serve.add_argument(
        "--max-message-mb",
        type=int,
        default=limits.max_message_bytes // 2**20,
        help="largest request or response message, MiB",
    )
    serve.add_argument(
        "--grace-seconds",
        type=float,
        default=defaults.grace_seconds,
        help="on SIGTERM, time in-flight requests get to finish (new ones are refused at "
        "once); then what is left is answered UNAVAILABLE / 503 and the process exits within "
        "about a second",
    )
    serve.add_argument(
        "--max-connection-age-s",
        type=float,
        default=defaults.max_connection_age_s,
        help="close each gRPC connection after this long, so that clients of a dns:/// pool "
        "re-resolve and spread onto replicas added since (in-flight calls get "
        "--grace-seconds); 0 = never",
    )
    serve.set_defaults(run=_serve)

    health = commands.add_parser(
        "health", help="exit 0 if a server's gRPC health service reports SERVING, else 1"
    )
    health.add_argument("--address", default=f"127.0.0.1:{defaults.port}", help="host:port")
    health.add_argument(
        "--service",
        default="",
        help="the service to ask about: '' (default) is the whole server, "
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
