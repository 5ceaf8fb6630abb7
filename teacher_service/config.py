"""Server configuration: dataclasses that `teacher-service serve` fills from its flags.

Each field is declared once, with `option(default, help, ...)`: teacher_service/flags.py
generates its flag from it (name, type, default, help, choices), so that the help, the
default and the checks below cannot drift apart. A ValueError from `__post_init__` starts
with the field's name (or names the flags of a rule over several), so the CLI can name the
flag in its error.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")
BACKENDS = ("huggingface", "openai", "tgi")
MIB = 1024 * 1024


def option(default: Any, help: str, **cli: Any) -> Any:
    """A field with its one description; `cli` says how its flag differs from the default
    rule (flags.py: flag, choices, to_cli, from_cli)."""
    return field(default=default, metadata={"help": help, **cli})


def _token_from_file(path: str | None) -> str:
    """--auth-token-file's token, else $TEACHER_AUTH_TOKEN's (imported here: auth needs grpc)."""
    from teacher_service.auth import read_token

    return read_token(path)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Larger requests get RESOURCE_EXHAUSTED, naming the limit."""

    max_batch_tokens: int = option(8192, "padded tokens in one forward pass (rows x longest)")
    max_tokens_per_request: int = option(
        65536, "tokens one request may send, over all its sequences"
    )
    max_sequences_per_request: int = option(1024, "sequences one request may send")
    max_message_bytes: int = option(
        256 * MIB,
        "largest request or response message, MiB",
        flag="--max-message-mb",
        to_cli=lambda size: size // MIB,
        from_cli=lambda mib: mib * MIB,
    )
    max_queued_tokens: int = option(
        4 * 1024 * 1024,
        "a hard cap on the tokens waiting in the batcher, whatever the estimate says "
        "(beyond it requests are refused like --max-queue-forwards)",
    )
    max_queue_forwards: float = option(
        2.0,
        "admission: a request is refused at once (RESOURCE_EXHAUSTED / HTTP 429, with a "
        "retry-after hint) while the work ahead of it would take more than this many "
        "forwards, at the model's measured speed; a forward holds the model's efficient "
        "batch or 4 requests of the recent mean size (at most --max-batch-tokens); an "
        "admitted request waits about this many forwards plus its own; inf: off",
    )

    def __post_init__(self) -> None:
        for name in (
            "max_batch_tokens",
            "max_tokens_per_request",
            "max_sequences_per_request",
            "max_queued_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_queue_forwards > 0:  # inf: admission off (max_queued_tokens only)
            raise ValueError(f"max_queue_forwards must be > 0, got {self.max_queue_forwards}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")


@dataclass(frozen=True)
class ServerConfig:
    """How `teacher-service serve` runs: the model, its front ends and their limits."""

    model: str = field(
        metadata={
            "help": "local model directory (config.json, weights, tokenizer); with --backend "
            "openai / tgi, the upstream model's tokenizer directory"
        }
    )
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for all)")
    port: int = option(50051, "gRPC port (0 picks a free port)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    device_map: str = option(
        "",
        "a teacher larger than one GPU: accelerate places its layers across the node's "
        "GPUs (auto, balanced, sequential) or as a JSON file of module name -> device says "
        "(a GPU index, cuda:N, cpu, disk); one GPU computes at a time. Not with --device",
    )
    dtype: str = option("float32", "the model's weights", choices=DTYPES)
    score_chunk_mb: int = option(
        256,
        "MiB of float32 logits computed at once: the output layer runs on the scored rows "
        "only, this many at a time (peak memory is a few times this)",
    )
    share_prefixes: bool = option(
        True, "a prefix several sequences of a batch share runs once (off: every sequence whole)"
    )
    pack: bool = option(
        True,
        "short unshared sequences share a row instead of being padded to the batch's longest",
        flag="--packing",
    )
    deterministic: bool = option(
        False,
        "batch-invariant scores: every sequence runs in a forward of its own, so its "
        "log-probs are bit-identical whatever it is batched with (other clients, sizes, "
        "packing, shared prefixes, arrival order); slower: no batching across sequences",
    )
    full_logits: bool = option(
        False,
        "apply the output layer to every position, model(...).logits (slower; for "
        "comparison: the default scores only the asked rows)",
    )
    max_wait_ms: float = option(
        20.0, "the longest the oldest queued sequence waits for others to batch with"
    )
    worker_nice: int = option(
        10,
        "run the model worker thread this much nicer than the rest of the process (Linux, "
        "0-19), so the front door's threads preempt a running forward and answer or refuse "
        "calls on time under load; threads of other processes in the same cgroup compete "
        "with it at that weight too: 0 when the service shares its cores with a process "
        "(a trainer) that must not outrank it",
    )
    warm_up: bool = option(
        True,
        "before serving, time forwards of growing size (up to --max-batch-tokens), so that "
        "admission and forward sizing start from the model's real speed (off: for tests "
        "that gate the model's forwards)",
    )
    freeze_heap: bool = option(
        True,
        "freeze what start-up built out of the garbage collector's full passes (each pass "
        "over it stops every thread for 100-250 ms on 2 CPU cores; off: to measure that)",
    )
    threads: int = option(
        0,
        "torch's intra-op and inter-op threads and the tokenizers' (causal_lm/threads.py); 0: "
        "$TEACHER_THREADS, else $OMP_NUM_THREADS, else the CPUs the process's affinity mask "
        "and cgroup CPU quota allow",
    )
    limits: Limits = Limits()
    grace_seconds: float = option(
        5.0,
        "on SIGTERM, time in-flight requests get to finish (new ones are refused at once); "
        "then what is left is answered UNAVAILABLE / 503 and the process exits within about "
        "a second",
    )
    max_connection_age_s: float = option(
        0.0,
        "close each gRPC connection after this long (GOAWAY), so that clients of a dns:/// "
        "pool re-resolve and spread onto replicas added since (in-flight calls get "
        "--grace-seconds); 0 = never",
    )
    grpc: bool = option(True, "serve the gRPC front end on --port")
    grpc_max_concurrent_rpcs: int = option(
        1024,
        "gRPC: calls in progress at once (a stream counts as one for its whole life, "
        "health checks and a pooled client's health Watch too); a call past the cap gets "
        "RESOURCE_EXHAUSTED at once, before any handler runs",
    )
    backend: str = option(
        "huggingface",
        "huggingface: the model in --model; openai / tgi: front the --upstream server "
        "(a vLLM/SGLang or TGI endpoint; --model is then its tokenizer's directory)",
        choices=BACKENDS,
    )
    upstream: str = option(
        "", "the upstream server's URL for --backend openai / tgi, e.g. http://vllm:8000"
    )
    http_port: int | None = option(
        None,
        "also serve HTTP here (native API, vLLM/OpenAI and TGI dialects, /metrics); "
        "None: off; 0: a free port",
    )
    http_header_timeout_s: float = option(
        10.0,
        "HTTP: a request line and headers must arrive within this long of the connection "
        "opening (or the request's first byte), else 408 and the connection is closed",
    )
    http_body_timeout_s: float = option(
        60.0,
        "HTTP: a request body must arrive within this long of its headers, else 408 and "
        "the connection is closed",
    )
    http_max_connections: int = option(
        1024,
        "HTTP: open connections served at once; a request on one past the cap gets 503 "
        "and its connection is closed",
    )
    trust_request_chat_template: bool = option(
        False,
        "/v1/chat/completions renders a request's own `chat_template` (vLLM's flag): Jinja is "
        "sandboxed, but a template can loop long enough to hold the CPU; off, the model's "
        "template only",
    )
    auth_token: str = field(
        default="",
        repr=False,
        metadata={
            "help": "require this file's token as 'Authorization: Bearer <token>' on every "
            "front end but ZeroMQ (health checks stay open); None: $TEACHER_AUTH_TOKEN if "
            "set, else no auth",
            "flag": "--auth-token-file",
            "to_cli": lambda token: None,
            "from_cli": _token_from_file,
        },
    )
    tls_cert: str = option("", "PEM certificate chain: serve TLS on both front ends")
    tls_key: str = option("", "the certificate's PEM private key")
    tls_client_ca: str = option("", "mutual TLS: require client certificates signed by this CA")
    zmq_port: int = option(
        0,
        "also serve verl's GKD teacher protocol (ZeroMQ ROUTER, torch.save payloads) here; "
        "0 = off. No auth, no TLS: it listens on --zmq-host",
    )
    zmq_host: str = option(
        "127.0.0.1",
        "address the ZeroMQ front end listens on (loopback by default, whatever --host "
        "says; must stay loopback when auth or TLS is on)",
    )
    zmq_top_k: int = option(
        256,
        "top-k log-probs per row for verl requests that name none (verl's teacher server: "
        "--n-logprobs 256); at most the vocabulary",
    )

    def __post_init__(self) -> None:
        if self.max_connection_age_s < 0:
            raise ValueError(f"max_connection_age_s must be >= 0, got {self.max_connection_age_s}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if not 0 <= self.worker_nice <= 19:  # a negative nice needs privileges
            raise ValueError(f"worker_nice must be in [0, 19], got {self.worker_nice}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: automatic), got {self.threads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.score_chunk_mb < 1:
            raise ValueError(f"score_chunk_mb must be >= 1, got {self.score_chunk_mb}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        for name in ("http_header_timeout_s", "http_body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.http_max_connections < 1:
            raise ValueError(f"http_max_connections must be >= 1, got {self.http_max_connections}")
        if self.grpc_max_concurrent_rpcs < 1:
            raise ValueError(
                f"grpc_max_concurrent_rpcs must be >= 1, got {self.grpc_max_concurrent_rpcs}"
            )
        if self.device_map and self.device != "auto":
            raise ValueError(
                f"--device-map {self.device_map} places the model's layers itself: it does not "
                f"go with --device {self.device} (leave --device at auto)"
            )
        if self.device_map and self.backend != "huggingface":
            raise ValueError("--device-map places a local model: not with --backend openai or tgi")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if (self.backend != "huggingface") != bool(self.upstream):
            raise ValueError("--upstream URL goes with --backend openai or tgi (and only them)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if not 0 <= self.zmq_port <= 65535:
            raise ValueError(f"zmq_port must be in [0, 65535] (0: off), got {self.zmq_port}")
        if self.zmq_top_k < 1:
            raise ValueError(f"zmq_top_k must be >= 1, got {self.zmq_top_k}")
        if self.zmq_port and (self.auth_token or self.tls_cert) and not _loopback(self.zmq_host):
            raise ValueError(
                "--zmq-port has no auth and no TLS: with --auth-token-file or --tls-cert it may "
                f"only listen on loopback (--zmq-host 127.0.0.1 or ::1), not {self.zmq_host!r}"
            )
        if not self.grpc and self.http_port is None and not self.zmq_port:
            raise ValueError(
                "every front end is off: serve gRPC, HTTP (--http-port), ZeroMQ (--zmq-port)"
            )

    def address(self, port: int) -> str:
        """host:port to listen on or dial (an IPv6 host in brackets)."""
        host = self.host
        return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _loopback(host: str) -> bool:
    """Whether `host` is a loopback name or address (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
