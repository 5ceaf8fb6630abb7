"""Benchmark the teacher service against its physical limit, the model's forward pass.

Run it from the repository root (`make bench` does):

    .venv/bin/python bench/bench_service.py            # ~2-3 minutes on 2 CPU cores
    .venv/bin/python bench/bench_service.py --quick    # under a minute, smaller shapes
    .venv/bin/python bench/bench_service.py --model DIR --device cuda --json out.json

It checks the three performance targets of docs/design.md ("Performance targets"):

1. Throughput. Tokens scored per second through the service, against an in-process
   forward of the same model on the same batch (`model(input_ids).logits` under
   torch.inference_mode). The forward is the physical limit, so the ratio is the cost of
   everything else: validation, batching, the scoring math, encoding, gRPC, decoding.
   Target: >= 0.85. A second in-process baseline adds the scoring math (log_softmax and
   top-k: teacher_service.scoring.score_rows per sequence, as the backend calls it), so
   the table shows how much of the gap is math and how much is the service.
2. Batching. 8 client threads each sending small requests (1 sequence of 32 tokens) one
   after another, against one client sending the same requests alone. The dynamic batcher
   should merge concurrent requests into shared forwards. Target: >= 3x. For reference,
   the table also shows what batching buys inside the model: the backend's score_batch on
   the same sequences 8 at a time against 1 at a time, in process (no service at all).
3. Wire. Serialized ScoreResponse bytes per scored token at top_k = 64 in float16. The
   floor is 2 + 64 * (4 + 2) = 386 bytes (target, top-k ids, top-k log-probs).
   Target: <= 420.

The server runs as a separate process, started exactly as a user starts it
(`python -m teacher_service serve ...`); the in-process baselines run in this process
while the server is idle. These machines are noisy, so throughput and batching alternate
baseline and service measurements for several rounds and the table reports medians (with
each round's values and the spread, so a noisy run can be recognized and rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import torch
from transformers.utils import logging as hf_logging

from student_trainer.tiny_model import TinyModelSpec, build_tiny_model
from teacher_client import TeacherClient, TeacherServiceError, build_score_request
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_service.backend import HFBackend, ScoreItem
from teacher_service.cli import free_port
from teacher_service.scoring import ScoreOptions, score_rows

ROOT = Path(__file__).resolve().parent.parent
THROUGHPUT_TARGET = 0.85  # service tokens/s over in-process forward tokens/s
BATCHING_TARGET = 3.0  # concurrent clients over one client, sequences/s
WIRE_TARGET = 420.0  # bytes per scored token at top_k = 64, float16
NOISY_SPREAD = 0.5  # (max - min) / median over rounds above which the run is flagged

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
    """The cached benchmark model under .cache/, built on first use.

    build_tiny_model's BPE runs out of merges on its small synthetic corpus (about 1.4k
    tokens whatever vocab_size asks for), so the vocabulary is topped up with plain added
    tokens and the embeddings resized: the lm_head and the scoring math grow with it.
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


def server_memory(pid: int) -> dict[str, float | None]:
    """The server's peak resident memory (Linux /proc) and its GPU memory (nvidia-smi)."""
    rss = None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            rss = int(line.split()[1]) / 1024
    gpu = None
    try:
        query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"]
        for line in subprocess.run(query, capture_output=True, text=True).stdout.splitlines():
            found, used = (part.strip() for part in line.split(","))
            if int(found) == pid:
                gpu = float(used.split()[0])
    except (OSError, ValueError):
        pass
    return {"rss_peak_mib": rss, "gpu_mib": gpu}


@dataclass
class ServerProcess:
    """`python -m teacher_service serve ...` as a child process, its output in a log file."""

    command: list[str]
    address: str
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self, env: dict[str, str], timeout: float = 180.0) -> None:
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        with TeacherClient(self.address) as client:
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
        """SIGTERM (a graceful shutdown), then SIGKILL if it does not exit in time."""
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


# --- what is timed ---------------------------------------------------------------------------
# Each function returns a closure that does one measurement's work; main() times them.


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def in_process_forward(backend: HFBackend, input_ids: torch.Tensor, reps: int) -> Callable:
    """`model(input_ids).logits`, reps times: the physical limit."""

    @torch.inference_mode()
    def run() -> None:
        for _ in range(reps):
            backend.model(input_ids).logits  # noqa: B018 (the forward is the point)
        sync(backend.device)

    return run


def in_process_scoring(
    backend: HFBackend, input_ids: torch.Tensor, targets: torch.Tensor, top_k: int, reps: int
) -> Callable:
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


def in_process_batches(
    backend: HFBackend, sequences: list[list[int]], batch_size: int, top_k: int
) -> Callable:
    """The backend's score_batch (what the server's model worker runs) over the sequences,
    batch_size at a time: what batching buys inside the model, with no service around it."""
    options = ScoreOptions(top_k=top_k, dtype=torch.float16)
    items = [ScoreItem(torch.tensor(s), 1, options) for s in sequences]

    def run() -> None:
        for start in range(0, len(items), batch_size):
            backend.score_batch(items[start : start + batch_size])

    return run


def through_service(
    client: TeacherClient, sequences: list[list[int]], top_k: int, reps: int, window: int
) -> Callable:
    """The same batch, reps times, pipelined over one ScoreStream (`window` requests in
    flight), so one batch's encoding, transfer and decoding overlap the next one's forward."""
    call = {"sequences": sequences, "score_from": 1, "top_k": top_k, "dtype": "float16"}

    def run() -> None:
        answers = list(client.score_stream([call] * reps, window=window))
        assert len(answers) == reps and len(answers[-1]) == len(sequences)

    return run


def small_requests(
    clients: list[TeacherClient], sequences: list[list[int]], top_k: int
) -> Callable:
    """Each client, on a thread of its own, scores its share of the sequences one request
    (of one sequence) after another."""

    def run() -> None:
        errors: list[BaseException] = []

        def send(client: TeacherClient, share: list[list[int]]) -> None:
            try:
                for sequence in share:
                    client.score([sequence], 1, top_k=top_k, dtype="float16")
            except BaseException as error:
                errors.append(error)

        shares = [sequences[n :: len(clients)] for n in range(len(clients))]
        threads = [
            threading.Thread(target=send, args=pair) for pair in zip(clients, shares, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    return run


def wire_bytes_per_token(address: str, sequences: list[list[int]], top_k: int) -> float:
    """Serialized ScoreResponse size over scored tokens (score_from = 1: all but the first)."""
    request = build_score_request(sequences, 1, top_k=top_k, dtype="float16")
    options = [("grpc.max_receive_message_length", 1 << 30)]
    with grpc.insecure_channel(address, options=options) as channel:
        response = pb_grpc.TeacherStub(channel).Score(request, timeout=600)
    scored = sum(len(s) - 1 for s in sequences)
    return len(response.SerializeToString()) / scored


# --- results ---------------------------------------------------------------------------------


@dataclass
class Measurement:
    name: str
    unit: str
    rounds: list[float]  # one value per round (a single one for the wire size)
    baseline: str | None = None  # the measurement the ratio is taken against
    target: float | None = None  # on the ratio when there is a baseline, else on the value
    higher_is_better: bool = True
    ratio: float | None = None
    passed: bool | None = None

    @property
    def value(self) -> float:
        return statistics.median(self.rounds)

    @property
    def spread(self) -> float:
        """(max - min) / median over the rounds: how noisy this measurement was."""
        return (max(self.rounds) - min(self.rounds)) / self.value


def judge(measurements: list[Measurement]) -> None:
    by_name = {m.name: m for m in measurements}
    for m in measurements:
        if m.baseline is not None:
            m.ratio = m.value / by_name[m.baseline].value
        if m.target is not None:
            score = m.value if m.ratio is None else m.ratio
            m.passed = score >= m.target if m.higher_is_better else score <= m.target


def print_table(measurements: list[Measurement]) -> None:
    header = (
        f"{'measurement':<50} {'median':>10} {'unit':<6} {'spread':>6} "
        f"{'ratio':>6} {'target':>7}  result"
    )
    print(header)
    print("-" * len(header))
    for m in measurements:
        spread = f"{m.spread:.0%}" if len(m.rounds) > 1 else ""
        ratio = "" if m.ratio is None else f"{m.ratio:.2f}"
        target = "" if m.target is None else f"{'>=' if m.higher_is_better else '<='} {m.target:g}"
        result = "" if m.passed is None else ("PASS" if m.passed else "FAIL")
        print(
            f"{m.name:<50} {m.value:>10,.1f} {m.unit:<6} {spread:>6} {ratio:>6} {target:>7}"
            f"  {result}"
        )


# --- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    arg = parser.add_argument
    arg("--quick", action="store_true", help="smaller shapes, fewer rounds (about a minute)")
    arg("--model", help="a local HF causal-LM directory (default: the built benchmark model)")
    arg("--device", default="auto", help="auto, cpu, cuda or cuda:N (server and baseline)")
    arg("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights")
    arg("--batch-size", type=int, help="throughput: sequences per batch (16; quick 8)")
    arg("--seq-len", type=int, help="throughput: tokens per sequence (256; quick 128)")
    arg("--reps", type=int, help="throughput: batches per measurement (4; quick 3)")
    arg("--rounds", type=int, help="baseline/service alternations (5; quick 2)")
    arg("--window", type=int, default=2, help="throughput: ScoreStream requests in flight")
    arg("--clients", type=int, default=8, help="batching: concurrent clients")
    arg("--small-len", type=int, default=32, help="batching: tokens per request")
    arg("--small-requests", type=int, help="batching: requests per client per round (32; quick 12)")
    arg("--top-k", type=int, default=64)
    arg("--max-wait-ms", type=float, help="the server's --max-wait-ms (default: the server's)")
    arg(
        "--max-batch-tokens",
        type=int,
        help="the server's --max-batch-tokens (default: batch-size x (seq-len - 1), so that each "
        "of its throughput forwards has the in-process baseline's shape)",
    )
    arg("--threads", type=int, help="torch threads, both processes (default: torch's default)")
    arg("--vocab-size", type=int, default=4000, help="built model: vocabulary size")
    arg("--hidden-size", type=int, default=384, help="built model: hidden size")
    arg("--layers", type=int, default=6, help="built model: decoder layers")
    arg("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    defaults = {  # name: (default, --quick)
        "batch_size": (16, 8),
        "seq_len": (256, 128),
        "reps": (4, 3),
        "rounds": (5, 2),
        "small_requests": (32, 12),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main() -> None:
    args = parse_args()
    hf_logging.disable_progress_bar()  # keep the report readable
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else ensure_bench_model(bench_spec(args))
    backend = HFBackend.load(model_dir, device=args.device, dtype=args.dtype)
    device, vocab = backend.device, backend.vocab_size
    params = sum(p.numel() for p in backend.model.parameters())

    # throughput: one batch; score_from = 1, so every forward position is a scored token
    batch = torch.randint(
        0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    input_ids, targets = batch[:, :-1].to(device), batch[:, 1:].to(device)
    sequences = batch.tolist()
    scored_per_measurement = args.reps * input_ids.numel()
    # batching: clients x small_requests single-sequence requests, the same ones for both
    n_small = args.clients * args.small_requests
    small = torch.randint(
        0, vocab, (n_small, args.small_len), generator=torch.Generator().manual_seed(1)
    ).tolist()

    port = free_port()
    address = f"127.0.0.1:{port}"
    max_batch_tokens = args.max_batch_tokens or args.batch_size * (args.seq_len - 1)
    server_cmd = [sys.executable, "-m", "teacher_service", "serve", "--model", str(model_dir)]
    server_cmd += ["--port", str(port), "--device", args.device, "--dtype", args.dtype]
    if args.max_wait_ms is not None:
        server_cmd += ["--max-wait-ms", f"{args.max_wait_ms:g}"]
    server_cmd += ["--max-batch-tokens", str(max_batch_tokens)]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's default follows it
    log_path = Path(tempfile.gettempdir()) / f"bench-teacher-server-{port}.log"
    server = ServerProcess(server_cmd, address, log_path)

    command = shlex.join([sys.executable, *sys.argv])
    server_threads = (
        f"OMP_NUM_THREADS={args.threads}" if args.threads else f"torch default ({default_threads})"
    )
    print(f"command:       {command}")
    print(
        f"platform:      python {platform.python_version()}, torch {torch.__version__}, "
        f"device {device}, {os.cpu_count()} CPUs"
    )
    print(f"torch threads: {torch.get_num_threads()} in this process; server: {server_threads}")
    print(
        f"model:         {model_dir} ({params / 1e6:.1f}M params, vocab {vocab}, "
        f"{backend.model_dtype})"
    )
    print(
        f"throughput:    batch {args.batch_size} x {args.seq_len} tokens "
        f"({input_ids.numel()} scored), "
        f"{args.reps} batches per measurement, ScoreStream window {args.window}, "
        f"top_k {args.top_k}, float16"
    )
    print(
        f"batching:      {args.clients} clients x {args.small_requests} requests of 1 x "
        f"{args.small_len} tokens, vs 1 client sending all {n_small}"
    )
    print(f"rounds:        {args.rounds}, alternating baseline and service; medians reported")
    print(f"server:        {shlex.join(server_cmd)}")
    print(f"server log:    {log_path}")
    print(flush=True)

    try:
        server.start(env)
        client = TeacherClient(address, timeout=600)
        clients = [TeacherClient(address, timeout=600) for _ in range(args.clients)]
        timed = {  # name -> closure; every round runs them all, in this order
            "forward": in_process_forward(backend, input_ids, args.reps),
            "service": through_service(client, sequences, args.top_k, args.reps, args.window),
            "forward+score": in_process_scoring(backend, input_ids, targets, args.top_k, args.reps),
            "1 client": small_requests(clients[:1], small, args.top_k),
            f"{args.clients} clients": small_requests(clients, small, args.top_k),
            "in-process 1": in_process_batches(backend, small, 1, args.top_k),
            f"in-process {args.clients}": in_process_batches(
                backend, small, args.clients, args.top_k
            ),
        }
        done = dict.fromkeys(["forward", "service", "forward+score"], scored_per_measurement)
        # warm up both sides: first forwards allocate, first calls connect
        in_process_forward(backend, input_ids, 1)()
        through_service(client, sequences, args.top_k, 1, 1)()
        small_requests(clients, small[: 2 * args.clients], args.top_k)()

        runs: dict[str, list[float]] = {name: [] for name in timed}
        for r in range(args.rounds):
            for name, fn in timed.items():
                start = time.perf_counter()
                fn()
                runs[name].append(done.get(name, n_small) / (time.perf_counter() - start))
            print(
                f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in runs.items()),
                flush=True,
            )
        wire_batch = wire_bytes_per_token(address, sequences, args.top_k)
        wire_small = wire_bytes_per_token(address, small[:1], args.top_k)
        memory = server_memory(server.process.pid)
    finally:
        server.stop()

    c = args.clients
    shape = f"{args.batch_size} x {args.seq_len}"
    measurements = [
        Measurement(f"throughput: in-process forward, {shape}", "tok/s", runs["forward"]),
        Measurement(
            "throughput: in-process forward + score_rows",
            "tok/s",
            runs["forward+score"],
            baseline=f"throughput: in-process forward, {shape}",
        ),
        Measurement(
            f"throughput: service, ScoreStream window {args.window}",
            "tok/s",
            runs["service"],
            baseline=f"throughput: in-process forward, {shape}",
            target=THROUGHPUT_TARGET,
        ),
        Measurement("batching: service, 1 client", "seq/s", runs["1 client"]),
        Measurement(
            f"batching: service, {c} concurrent clients",
            "seq/s",
            runs[f"{c} clients"],
            baseline="batching: service, 1 client",
            target=BATCHING_TARGET,
        ),
        Measurement("batching (ref): in-process score_batch of 1", "seq/s", runs["in-process 1"]),
        Measurement(
            f"batching (ref): in-process score_batch of {c}",
            "seq/s",
            runs[f"in-process {c}"],
            baseline="batching (ref): in-process score_batch of 1",
        ),
        Measurement(
            f"wire: ScoreResponse bytes/token, {shape}",
            "B",
            [wire_batch],
            target=WIRE_TARGET,
            higher_is_better=False,
        ),
        Measurement(
            f"wire: ScoreResponse bytes/token, 1 x {args.small_len}",
            "B",
            [wire_small],
            target=WIRE_TARGET,
            higher_is_better=False,
        ),
    ]
    judge(measurements)
    median = {name: statistics.median(values) for name, values in runs.items()}
    service_overhead = median["service"] / median["forward+score"]
    batching_recovered = median[f"{c} clients"] / median[f"in-process {c}"]
    print()
    print_table(measurements)
    print(
        f"\nservice / in-process forward + score_rows: {service_overhead:.2f} (what the service "
        "itself costs; the rest of the throughput gap is the scoring math)"
    )
    print(
        f"service, {c} clients / in-process score_batch of {c}: {batching_recovered:.2f} (how much "
        "of the model's own batching gain the batcher recovers across clients)"
    )
    print(
        f"server memory: peak RSS {memory['rss_peak_mib']:,.0f} MiB"
        + (f", GPU {memory['gpu_mib']:,.0f} MiB" if memory["gpu_mib"] is not None else "")
        + " (what one replica of this model needs, for sizing)"
    )
    failed = [m.name for m in measurements if m.passed is False]
    print("\nall targets met" if not failed else "\nFAILED: " + "; ".join(failed))
    noisy = [m.name for m in measurements if len(m.rounds) > 1 and m.spread > NOISY_SPREAD]
    if noisy:
        print(
            f"warning: rounds differ by more than {NOISY_SPREAD:.0%} (a noisy machine?): "
            + "; ".join(noisy)
            + ". Rerun, or raise --rounds."
        )

    if args.json:
        report = {
            "command": command,
            "server_command": shlex.join(server_cmd),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": str(device),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "server_threads": args.threads or default_threads,
            "model": str(model_dir),
            "params": params,
            "vocab_size": vocab,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "measurements": [
                asdict(m) | {"value": m.value, "spread": m.spread} for m in measurements
            ],
            "service_over_forward_and_score": service_overhead,
            "clients_over_in_process_batch": batching_recovered,
            "server_memory_mib": memory,
            "all_passed": not failed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
