"""Server configuration: one dataclass, filled from the CLI (`teacher-service serve`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Larger requests get RESOURCE_EXHAUSTED, naming the limit."""

    max_batch_tokens: int = 8192  # padded tokens in one forward pass (batch size x longest)
    max_tokens_per_request: int = 65536
    max_sequences_per_request: int = 1024
    max_message_bytes: int = 256 * 1024 * 1024  # request and response messages
    max_queued_tokens: int = 4 * 1024 * 1024  # a hard cap on queued tokens (429 beyond it)
    # admission: the longest wait for a forward the queue may promise, in forwards of the
    # batcher's budget at the measured rate (batcher.py): beyond it a request is refused at
    # once with a retry hint (429). Relative, so that it holds from a 2M model on CPU cores
    # (forwards of milliseconds) to a 70B one on GPUs (seconds): an admitted request waits
    # about this many forwards plus its own
    max_queue_forwards: float = 2.0

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
    model: str
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # a teacher larger than one GPU: accelerate places its layers across the node's devices
    # (auto, balanced, sequential, or a JSON file of module -> device); "" off: `device`
    device_map: str = ""
    dtype: str = "float32"  # the model's weights: float32, float16, bfloat16
    score_chunk_mb: int = 256  # float32 logits computed at once when scoring (memory bound)
    share_prefixes: bool = True  # a prefix several sequences of a batch share runs once
    pack: bool = True  # short unshared sequences share a row instead of padding
    full_logits: bool = False  # score from model(...).logits over every position (the old path)
    max_wait_ms: float = 20.0  # the longest the oldest queued sequence waits for company
    # the model worker thread's nice value above the process's (Linux): the front door's
    # threads preempt a running forward, so calls are read and refused on time under load
    # (batcher.ModelWorker). Threads of other processes in the same cgroup compete with it
    # at that weight too: 0 when the service shares its cores with a trainer that must not
    # outrank it
    worker_nice: int = 10
    # time forwards of growing size before serving (capacity.warm_up), so that admission
    # and forward sizing start from the model's measured speed. Off: tests that gate the
    # model's forwards
    warm_up: bool = True
    # `serve` freezes what start-up built out of garbage collection: a full collection of
    # it stops every thread for 100-250 ms on 2 CPU cores (heap.py). Off: to measure that
    freeze_heap: bool = True
    # torch's intra-op and inter-op threads and the tokenizers' (threads.py). 0: automatic,
    # TEACHER_THREADS or OMP_NUM_THREADS if set, else the CPUs the process's affinity mask
    # and cgroup quota allow. `serve` applies it: the process is the service's alone
    threads: int = 0
    limits: Limits = Limits()
    grace_seconds: float = 5.0  # in-flight requests finish on shutdown for this long
    # close each gRPC connection after this long (GOAWAY; in-flight calls get grace_seconds),
    # so clients reconnect and re-resolve dns:/// names: replicas added later get traffic.
    # 0: connections live for ever
    max_connection_age_s: float = 0.0
    grpc: bool = True  # serve the gRPC front end on `port`
    # gRPC calls in progress at once; past it a call gets RESOURCE_EXHAUSTED at once, before
    # any handler runs (grpc_api.start_grpc). A stream is one call for its whole life: a
    # ScoreStream, a pooled client's health Watch (one per replica it talks to)
    grpc_max_concurrent_rpcs: int = 1024
    backend: str = "huggingface"  # or "openai" / "tgi": front an upstream server
    upstream: str = ""  # the upstream's URL for a remote backend
    http_port: int | None = None  # serve the HTTP front end there (None: off; 0: a free port)
    # HTTP connection hygiene (web/server.py): a request's line and headers must arrive
    # within this long, its body within the next; past them the client gets 408 and is
    # closed, so slow clients cannot hold connections. Past the connection cap a request
    # gets 503 and its connection is closed.
    http_header_timeout_s: float = 10.0
    http_body_timeout_s: float = 60.0
    http_max_connections: int = 1024
    auth_token: str = field(default="", repr=False)  # require it as a bearer token ("" off)
    tls_cert: str = ""  # PEM certificate chain: serve TLS on both front ends ("" off)
    tls_key: str = ""  # its private key
    tls_client_ca: str = ""  # require client certificates signed by this CA (mutual TLS)
    # verl's GKD teacher protocol over ZeroMQ (zmq_api.py) on this port (0: off). It has no
    # auth and no TLS, so it listens on loopback unless zmq_host says otherwise
    zmq_port: int = 0
    zmq_host: str = "127.0.0.1"
    zmq_top_k: int = 256  # top-k when a request names none (verl's teacher: --n-logprobs 256)

    def __post_init__(self) -> None:
        if self.max_connection_age_s < 0:
            raise ValueError(f"max_connection_age_s must be >= 0, got {self.max_connection_age_s}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if not 0 <= self.worker_nice <= 19:  # a negative nice needs privileges
            raise ValueError(f"worker_nice must be in [0, 19], got {self.worker_nice}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: automatic), got {self.threads}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
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
        if self.backend not in ("huggingface", "openai", "tgi"):
            raise ValueError(f"backend must be huggingface, openai or tgi, got {self.backend!r}")
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
