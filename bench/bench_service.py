"""Benchmark the teacher service against its physical limit, the model's forward pass.

Run it from the repository root (`make bench` does):

    .venv/bin/python bench/bench_service.py            # ~3-5 minutes on 2 CPU cores
    .venv/bin/python bench/bench_service.py --quick    # ~1 minute, smaller shapes
    .venv/bin/python bench/bench_service.py --model DIR --device cuda --json out.json

It checks the three performance targets of DESIGN.md ("Performance targets"):

1. Throughput. Tokens scored per second through the service, against an in-process
   forward of the same model on the same batch (`model(input_ids).logits` under
   torch.inference_mode). The service is what a trainer pays for; the forward is the
   physical limit, so their ratio is the overhead of everything else (validation,
   batching, the scoring math, encoding, gRPC, decoding). Target: >= 0.85. A second
   in-process baseline adds the scoring math (log_softmax + top-k, exactly
   teacher_service.scoring.score_rows per row, as the backend calls it), so the table
   shows how much of the gap is math and how much is the service.
2. Batching. 8 client threads sending small requests (1 sequence of ~32 tokens) one
   after another, against one client sending the same requests alone. The dynamic
   batcher should merge concurrent requests into shared forwards. Target: >= 3x.
3. Wire. Serialized ScoreResponse bytes per scored token at top_k = 64 in float16.
   The floor is 2 + 64 * (4 + 2) = 386 bytes (target, top-k ids, top-k log-probs).
   Target: <= 420.

The server runs as a separate process, exactly as a user starts it
(`python -m teacher_service serve ...`). These machines are noisy, so the throughput
and batching measurements alternate between baseline and service for several rounds
and the table reports medians (each round's values are printed too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from teacher_service.backend import HFBackend
from teacher_service.client import TeacherClient, TeacherServiceError, build_score_request
from teacher_service.proto import teacher_pb2_grpc as pb_grpc
from teacher_service.scoring import ScoreOptions, score_rows
from teacher_service.tiny_model import TinyModelSpec, build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
THROUGHPUT_TARGET = 0.85  # service tokens/s over in-process forward tokens/s
BATCHING_TARGET = 3.0  # 8 concurrent clients over one unbatched client, sequences/s
WIRE_TARGET = 420.0  # bytes per scored token at top_k = 64, float16

# --- the benchmark model ---------------------------------------------------------------------


def bench_spec(args: argparse.Namespace) -> TinyModelSpec:
    return TinyModelSpec(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 8 // 3 // 64 * 64,  # Llama's ~8/3, rounded
        num_layers=args.layers,
        num_heads=args.hidden_size // 64,
        num_kv_heads=2,
        max_seq_len=2048,
        init_std=0.02,
    )


def ensure_bench_model(spec: TinyModelSpec) -> Path:
    """The cached benchmark model, built on first use.

    build_tiny_model's BPE runs out of merges on its small synthetic corpus (about 1.4k
    tokens), so a larger vocab_size is reached by adding plain tokens to the tokenizer and
    rows to the embeddings; the cost of the lm_head and the scoring math grows with it.
    """
    name = f"bench-model-v{spec.vocab_size}-h{spec.hidden_size}-l{spec.num_layers}"
    out = ROOT / ".cache" / name
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"building the benchmark model in {out} ...", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=name + ".", dir=out.parent))
    build_tiny_model(tmp, spec)
    tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    missing = spec.vocab_size - len(tokenizer)
    if missing > 0:
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(missing)])
        model = AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True)
        padded = (len(tokenizer) // 64 + 1) * 64  # padded past the vocabulary, as built
        model.resize_token_embeddings(padded, mean_resizing=False)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


# --- the server process ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    command: list[str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self, env: dict[str, str], timeout: float = 180.0) -> None:
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        address = "127.0.0.1:" + self.command[self.command.index("--port") + 1]
        deadline = time.monotonic() + timeout
        with TeacherClient(address) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    code = self.process.returncode
                    raise RuntimeError(f"the server exited ({code}):\n{self.tail()}")
                try:
                    client.wait_until_serving(timeout=2.0)
                    return
                except (TimeoutError, TeacherServiceError):
                    continue
        raise TimeoutError(f"the server did not report SERVING in {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# --- measurements ----------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Measurement:
    name: str
    unit: str
    rounds: list[float]  # one value per round (a single one for the wire size)
    baseline: str | None = None  # the name of the measurement the ratio is taken against
    target: float | None = None
    higher_is_better: bool = True
    ratio: float | None = None
    passed: bool | None = None
    extra: dict = field(default_factory=dict)

    @property
    def value(self) -> float:
        return statistics.median(self.rounds)


def in_process_forward(
    backend: HFBackend, input_ids: torch.Tensor, reps: int
) -> Callable[[], None]:
    """`model(input_ids).logits`, reps times: the physical limit."""

    @torch.inference_mode()
    def run() -> None:
        for _ in range(reps):
            backend.model(input_ids).logits  # noqa: B018 (the forward is the point)
        sync(backend.device)

    return run


def in_process_scoring(
    backend: HFBackend, input_ids: torch.Tensor, targets: torch.Tensor, top_k: int, reps: int
) -> Callable[[], None]:
    """The forward plus the backend's scoring math (score_rows per sequence), reps times."""
    options = ScoreOptions(top_k=top_k, dtype=torch.float16)

    @torch.inference_mode()
    def run() -> None:
        for _ in range(reps):
            logits = backend.model(input_ids).logits
            for row in range(logits.shape[0]):
                score_rows(logits[row], targets[row], backend.vocab_size, options)
        sync(backend.device)

    return run


def through_service(
    client: TeacherClient, sequences: list[list[int]], top_k: int, reps: int, window: int
) -> Callable[[], None]:
    """The same batch, reps times, pipelined over one ScoreStream (`window` in flight), so
    that one batch's encoding, transfer and decoding overlap the next one's forward."""
    call = {"sequences": sequences, "score_from": 1, "top_k": top_k, "dtype": "float16"}

    def run() -> None:
        answers = list(client.score_stream([call] * reps, window=window))
        assert len(answers) == reps and len(answers[-1]) == len(sequences)

    return run


def small_requests(
    clients: list[TeacherClient], sequences: list[list[int]], top_k: int
) -> Callable[[], None]:
    """Each client, on a thread of its own, scores its share of the sequences one request
    (of one sequence) after another."""

    def send(client: TeacherClient, share: list[list[int]]) -> None:
        for sequence in share:
            client.score([sequence], 1, top_k=top_k, dtype="float16")

    def run() -> None:
        shares = [sequences[n :: len(clients)] for n in range(len(clients))]
        threads = [
            threading.Thread(target=send, args=pair) for pair in zip(clients, shares, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return run


def wire_bytes_per_token(address: str, sequences: list[list[int]], top_k: int) -> float:
    """Serialized ScoreResponse size over scored tokens (score_from = 1: all but the first)."""
    import grpc

    request = build_score_request(sequences, 1, top_k=top_k, dtype="float16")
    options = [("grpc.max_receive_message_length", 1 << 30)]
    with grpc.insecure_channel(address, options=options) as channel:
        response = pb_grpc.TeacherStub(channel).Score(request, timeout=600)
    scored = sum(len(s) - 1 for s in sequences)
    return len(response.SerializeToString()) / scored


# --- the run ---------------------------------------------------------------------------------


def random_sequences(count: int, length: int, vocab_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=generator)


def judge(m: Measurement, by_name: dict[str, Measurement]) -> None:
    if m.baseline is not None:
        m.ratio = m.value / by_name[m.baseline].value
    if m.target is not None:
        score = m.value if m.ratio is None else m.ratio
        m.passed = score >= m.target if m.higher_is_better else score <= m.target


def print_table(measurements: list[Measurement]) -> None:
    header = f"{'measurement':<44} {'median':>12} {'unit':<7} {'ratio':>6} {'target':>8}  result"
    print(header)
    print("-" * len(header))
    for m in measurements:
        ratio = "" if m.ratio is None else f"{m.ratio:.2f}"
        target = ""
        if m.target is not None:
            target = f"{'>=' if m.higher_is_better else '<='} {m.target:g}"
        result = "" if m.passed is None else ("PASS" if m.passed else "FAIL")
        print(f"{m.name:<44} {m.value:>12,.1f} {m.unit:<7} {ratio:>6} {target:>8}  {result}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer rounds")
    parser.add_argument("--model", help="a local HF causal-LM directory (default: built, cached)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (both sides)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="the model's weights (both sides)",
    )
    parser.add_argument("--batch-size", type=int, help="throughput: sequences per batch (16)")
    parser.add_argument("--seq-len", type=int, help="throughput: tokens per sequence (256)")
    parser.add_argument("--reps", type=int, help="throughput: batches per measurement (4)")
    parser.add_argument("--rounds", type=int, help="baseline/service alternations (3)")
    parser.add_argument("--window", type=int, default=2, help="ScoreStream requests in flight")
    parser.add_argument("--clients", type=int, default=8, help="batching: concurrent clients")
    parser.add_argument("--small-len", type=int, default=32, help="batching: tokens per request")
    parser.add_argument(
        "--small-requests", type=int, help="batching: requests per client per round (32)"
    )
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's batcher wait")
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        help="the server's budget (default: batch-size x (seq-len - 1), so its "
        "forwards have the baseline's shape)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads, both sides (default: torch's default)"
    )
    parser.add_argument("--vocab-size", type=int, default=4000, help="built model: vocabulary")
    parser.add_argument("--hidden-size", type=int, default=384, help="built model: hidden size")
    parser.add_argument("--layers", type=int, default=6, help="built model: layers")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    quick = args.quick
    defaults = {
        "batch_size": (16, 8),
        "seq_len": (256, 128),
        "reps": (4, 3),
        "rounds": (3, 2),
        "small_requests": (32, 12),
    }
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    return args


def main() -> None:
    args = parse_args()
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else ensure_bench_model(bench_spec(args))
    backend = HFBackend.load(model_dir, device=args.device, dtype=args.dtype)
    device, vocab = backend.device, backend.vocab_size
    params = sum(p.numel() for p in backend.model.parameters())
    batch = random_sequences(args.batch_size, args.seq_len, vocab, seed=0)
    input_ids, targets = batch[:, :-1].to(device), batch[:, 1:].to(device)
    sequences = batch.tolist()
    total_small = args.clients * args.small_requests
    small = random_sequences(total_small, args.small_len, vocab, seed=1).tolist()
    max_batch_tokens = args.max_batch_tokens or args.batch_size * (args.seq_len - 1)

    port = free_port()
    address = f"127.0.0.1:{port}"
    server_cmd = [
        sys.executable,
        "-m",
        "teacher_service",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--max-wait-ms",
        f"{args.max_wait_ms:g}",
        "--max-batch-tokens",
        str(max_batch_tokens),
    ]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    server_threads = args.threads or f"torch default ({default_threads})"
    log_path = Path(tempfile.gettempdir()) / f"bench-teacher-server-{port}.log"
    server = ServerProcess(server_cmd, log_path)

    print(f"command:       {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"python/torch:  {platform.python_version()} / torch {torch.__version__} on {device}, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"torch threads: {torch.get_num_threads()} in this process; server: {server_threads}")
    print(
        f"model:         {model_dir} ({params / 1e6:.1f}M params, vocab {vocab}, "
        f"{backend.model_dtype})"
    )
    print(
        f"throughput:    {args.batch_size} x {args.seq_len} tokens (score_from 1: "
        f"{input_ids.numel()} scored per batch), {args.reps} batches x {args.rounds} rounds, "
        f"ScoreStream window {args.window}, top_k {args.top_k}, float16"
    )
    print(
        f"batching:      {args.clients} clients x {args.small_requests} requests of 1 x "
        f"{args.small_len} tokens vs 1 client sending them all, {args.rounds} rounds"
    )
    print(f"server:        {shlex.join(server_cmd)}")
    print(f"server log:    {log_path}")
    print(flush=True)

    try:
        server.start(env)
        client = TeacherClient(address, timeout=600)
        clients = [TeacherClient(address, timeout=600) for _ in range(args.clients)]
        forward = in_process_forward(backend, input_ids, args.reps)
        scoring = in_process_scoring(backend, input_ids, targets, args.top_k, args.reps)
        service = through_service(client, sequences, args.top_k, args.reps, args.window)
        one = small_requests(clients[:1], small, args.top_k)
        many = small_requests(clients, small, args.top_k)

        # warm up both sides: first forwards allocate, first calls connect
        in_process_forward(backend, input_ids, 1)()
        through_service(client, sequences, args.top_k, 1, 1)()
        small_requests(clients, small[: args.clients * 2], args.top_k)()

        scored = args.reps * input_ids.numel()
        runs: dict[str, list[float]] = {k: [] for k in ("fwd", "score", "svc", "one", "many")}
        for r in range(args.rounds):
            runs["fwd"].append(scored / timed(forward))
            runs["svc"].append(scored / timed(service))
            runs["score"].append(scored / timed(scoring))
            runs["one"].append(total_small / timed(one))
            runs["many"].append(total_small / timed(many))
            print(
                f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in runs.items()),
                flush=True,
            )
        wire_big = wire_bytes_per_token(address, sequences, args.top_k)
        wire_small = wire_bytes_per_token(address, small[:1], args.top_k)
    finally:
        server.stop()

    svc_name = f"throughput: service (ScoreStream, window {args.window})"
    measurements = [
        Measurement("throughput: in-process forward", "tok/s", runs["fwd"]),
        Measurement(
            "throughput: in-process forward + score_rows",
            "tok/s",
            runs["score"],
            baseline="throughput: in-process forward",
        ),
        Measurement(
            svc_name,
            "tok/s",
            runs["svc"],
            baseline="throughput: in-process forward",
            target=THROUGHPUT_TARGET,
        ),
        Measurement("batching: 1 client, sequential", "seq/s", runs["one"]),
        Measurement(
            f"batching: {args.clients} clients, concurrent",
            "seq/s",
            runs["many"],
            baseline="batching: 1 client, sequential",
            target=BATCHING_TARGET,
        ),
        Measurement(
            f"wire: bytes/token, {args.batch_size} x {args.seq_len}",
            "B",
            [wire_big],
            target=WIRE_TARGET,
            higher_is_better=False,
        ),
        Measurement(
            f"wire: bytes/token, 1 x {args.small_len}",
            "B",
            [wire_small],
            target=WIRE_TARGET,
            higher_is_better=False,
        ),
    ]
    by_name = {m.name: m for m in measurements}
    for m in measurements:
        judge(m, by_name)
    print()
    print_table(measurements)
    failed = [m.name for m in measurements if m.passed is False]
    print(f"\n{'all targets met' if not failed else 'FAILED: ' + '; '.join(failed)}")

    if args.json:
        report = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "server_command": shlex.join(server_cmd),
            "torch": torch.__version__,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "server_threads": args.threads or default_threads,
            "model": str(model_dir),
            "params": params,
            "vocab_size": vocab,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "measurements": [asdict(m) | {"value": m.value} for m in measurements],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
