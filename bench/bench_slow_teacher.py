"""The slow-teacher table (issue 26): a model whose trainer-sized request takes seconds on
2 CPU cores, as a real teacher's forward takes seconds on its hardware, behind
`teacher-service serve` with its default flags beside the same server with admission off
(`--max-queue-forwards inf`), the same scenarios against each, in one run.

    .venv/bin/python bench/bench_slow_teacher.py            # ~13 minutes on 2 CPU cores
    .venv/bin/python bench/bench_slow_teacher.py --quick    # ~5 minutes
    .venv/bin/python bench/bench_slow_teacher.py --model qwen2-0.5b --sequences 2 --length 128

Not a test: it prints one table. The model defaults to distill_lab.tiny_model's
SLOW_TEACHER_SPEC (50M parameters; 8 x 256 tokens take about 1.3 s here) with the records
task's tokenizer, built under .cache/ on first use; `--model` takes bench_service.py's model
arguments too (`qwen2-0.5b`: Qwen2-0.5B's shape at random weights, a 152k vocabulary).
Every scenario runs against a freshly started server (its warm-up included), so each
starts as a user's first calls do. Requests are --sequences x --length random tokens
(default 8 x 256), every row scored, top-k 64 in float16, as a trainer asks.

- stream: one TeacherClient.score_stream, window 4, --stream-requests requests;
- unary: one TeacherClient.score caller in a closed loop for --seconds;
- 4 unary: four TeacherClient callers (one channel each) in a closed loop for --seconds;
- raw 32: 32 raw gRPC callers that ignore retry-after and send again 50 ms after a
  refusal, for --seconds;
- 2 trainers: two `student-trainer train` processes (configs/demo.yaml's records student,
  --trainer-steps steps each) against one server; skipped for a model whose tokenizer is
  not the records task's.

Columns: requests answered, errors the callers saw, refusals the server made (the clients
resubmit those after the hint: TeacherClient's unary calls and score_stream), tokens/s
answered, latency p50 / p99 of answered calls (from the first try), answered calls per
caller (min / max), and sequences per forward (the server's teacher_batch_sequences
histogram). The targets with the defaults: no errors for one stream or one unary caller,
4 callers' p99 <= 3 x their p50, every caller within 2 x the others' answered calls,
sequences per forward >= 3 x one caller's, both trainers finish, tokens/s >= 0.9 x the
same scenario with admission off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import ROOT, ServerProcess, resolve_model, tree_env

from distill_lab.tiny_model import SLOW_TEACHER_SPEC, build_tiny_model
from teacher_client import ScoreOptions, TeacherClient, TeacherServiceError, build_score_request
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_service.cli import free_port

RECORDS_TOKENIZER = ROOT / "models/records/tokenizer"
CONFIGS = {"default": [], "admission off": ["--max-queue-forwards", "inf"]}
RAW_RETRY_SECONDS = 0.05
OPTIONS = ScoreOptions(top_k=64, dtype="float16")  # of every call


@dataclass
class Outcome:
    """What one scenario's callers saw."""

    latencies: list[float] = field(default_factory=list)  # answered calls, from the first try
    per_caller: list[int] = field(default_factory=list)  # answered calls of each caller
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""

    def error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def slow_teacher() -> Path:
    """SLOW_TEACHER_SPEC with the records task's tokenizer, built under .cache/ once."""
    out = ROOT / ".cache" / "slow-teacher-records"
    if not (out / "config.json").is_file():
        print(f"building the slow teacher in {out} ...", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix="slow-teacher.", dir=out.parent))
        build_tiny_model(tmp, SLOW_TEACHER_SPEC, tokenizer_from=RECORDS_TOKENIZER)
        tmp.rename(out)
    return out


def batch_counters(http_port: int) -> tuple[float, float, float]:
    """(forwards, sequences in them, requests the server refused) from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = {"count": 0.0, "sum": 0.0, "refused": 0.0}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == "teacher_batch_sequences_count":
            found["count"] = float(value)
        elif name == "teacher_batch_sequences_sum":
            found["sum"] = float(value)
        elif name.startswith("teacher_requests_total{") and "RESOURCE_EXHAUSTED" in name:
            found["refused"] += float(value)
    return found["count"], found["sum"], found["refused"]


def calls(args: argparse.Namespace, vocab: int, seed: int):
    """Endless score calls of random tokens (score_stream's and score's keyword arguments)."""
    rng = random.Random(seed)
    while True:
        sequences = [
            [rng.randrange(3, vocab) for _ in range(args.length)] for _ in range(args.sequences)
        ]
        yield {"sequences": sequences, "score_from": 1, "options": OPTIONS}


def stream(address: str, args: argparse.Namespace, vocab: int) -> Outcome:
    out = Outcome(per_caller=[0])
    source = calls(args, vocab, 0)
    wanted = [next(source) for _ in range(args.stream_requests)]
    started = time.monotonic()
    with TeacherClient(address, timeout=args.seconds * 20) as client:
        try:
            for _ in client.score_stream(wanted, window=4):
                out.per_caller[0] += 1
        except TeacherServiceError as error:
            out.error(error.code.name)
    out.seconds = time.monotonic() - started
    return out


def unary(address: str, args: argparse.Namespace, vocab: int, callers: int) -> Outcome:
    """`callers` TeacherClients (a channel each) calling score in a closed loop."""
    out = Outcome(per_caller=[0] * callers)
    lock = threading.Lock()
    until = time.monotonic() + args.seconds

    def caller(n: int) -> None:
        source = calls(args, vocab, n)
        with TeacherClient(address, timeout=args.seconds * 10) as client:
            while time.monotonic() < until:
                call, sent = next(source), time.monotonic()
                try:
                    client.score(**call)
                except TeacherServiceError as error:
                    with lock:
                        out.error(error.code.name)
                    continue
                with lock:
                    out.latencies.append(time.monotonic() - sent)
                    out.per_caller[n] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=caller, args=(n,)) for n in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.seconds = time.monotonic() - started
    return out


def raw(address: str, args: argparse.Namespace, vocab: int) -> Outcome:
    """Raw grpc.aio callers that ignore retry-after: a refused call is sent again 50 ms
    later, a call's latency counted from its first try. The server holds such a caller
    until its booked return (teacher_requests_held_total)."""
    out = Outcome(per_caller=[0] * args.raw_callers)
    until = time.monotonic() + args.seconds

    async def caller(n: int) -> None:
        source = calls(args, vocab, n)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.TeacherStub(channel)
            request, first = None, 0.0
            while time.monotonic() < until:
                if request is None:
                    request, first = build_score_request(**next(source)), time.monotonic()
                try:
                    await stub.Score(request)  # no deadline: what is in flight at the end ends
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        out.error(error.code().name)
                        request = None
                    await asyncio.sleep(RAW_RETRY_SECONDS)
                    continue
                out.latencies.append(time.monotonic() - first)
                out.per_caller[n] += 1
                request = None

    async def everyone() -> None:
        await asyncio.gather(*(caller(n) for n in range(args.raw_callers)))

    started = time.monotonic()
    asyncio.run(everyone())
    out.seconds = time.monotonic() - started
    return out


def trainers(address: str, args: argparse.Namespace, run_dir: Path) -> Outcome:
    """Two `student-trainer train` runs of configs/demo.yaml's student at once."""
    out = Outcome(per_caller=[0, 0])

    def command(n: int) -> list[str]:
        overrides = [f"teacher.address={address}", f"optim.steps={args.trainer_steps}",
                     f"run.out_dir={run_dir / f'trainer-{n}'}", "run.save_every=0",
                     "run.eval_size=0", "run.progress=false", f"run.seed={n}"]  # fmt: skip
        sets = [flag for override in overrides for flag in ("--set", override)]
        return [sys.executable, "-m", "student_trainer", "train", "--config", "configs/demo.yaml",
                *sets]  # fmt: skip

    commands = [command(n) for n in range(2)]
    started = time.monotonic()
    processes = [
        subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    for n, process in enumerate(processes):
        output, _ = process.communicate()
        if process.returncode == 0:
            out.per_caller[n] = args.trainer_steps
        else:
            out.error(f"exit {process.returncode}")
            print(output[-2000:], file=sys.stderr)
    out.seconds = time.monotonic() - started
    out.note = f"{args.trainer_steps} steps each"
    return out


def run_scenario(
    scenario: str, address: str, args: argparse.Namespace, vocab: int, tmp: Path
) -> Outcome:
    if scenario == "stream":
        return stream(address, args, vocab)
    if scenario in ("unary", "4 unary"):
        return unary(address, args, vocab, 1 if scenario == "unary" else 4)
    if scenario == "raw 32":
        return raw(address, args, vocab)
    if scenario == "2 trainers":
        return trainers(address, args, tmp)
    sys.exit(f"bench_slow_teacher: unknown scenario {scenario!r}")


def row(config: str, scenario: str, out: Outcome, counters, args: argparse.Namespace) -> dict:
    forwards, sequences, refused = counters
    answered = sum(out.per_caller)
    tokens = (
        answered * args.sequences * args.length / out.seconds if scenario != "2 trainers" else 0
    )
    return {
        "config": config,
        "scenario": scenario,
        "answered": answered,
        "errors": out.errors,
        "refused": int(refused),
        "seconds": out.seconds,
        "tokens_per_s": tokens,
        "p50": percentile(out.latencies, 0.5),
        "p99": percentile(out.latencies, 0.99),
        "per_caller": (min(out.per_caller), max(out.per_caller)),
        "sequences_per_forward": sequences / forwards if forwards else float("nan"),
        "note": out.note,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter scenarios")
    parser.add_argument("--model", default="", help="default: the slow-teacher rig")
    parser.add_argument("--sequences", type=int, default=8, help="sequences per request")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--seconds", type=float, default=60.0, help="closed-loop scenarios")
    parser.add_argument("--stream-requests", type=int, default=20)
    parser.add_argument("--raw-callers", type=int, default=32)
    parser.add_argument("--trainer-steps", type=int, default=10)
    parser.add_argument(
        "--scenarios", default="stream,unary,4 unary,raw 32,2 trainers", help="comma-separated"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--config",
        action="append",
        metavar="NAME=FLAGS",
        help="server configurations to compare instead of the default and admission off, "
        "e.g. --config 'queue 4=--max-queue-forwards 4' (repeatable)",
    )
    parser.add_argument(
        "--server-tree",
        type=Path,
        help="run the servers from this source tree (e.g. an earlier commit's worktree)",
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.stream_requests, args.trainer_steps = 20.0, 8, 4
    model = resolve_model(args.model) if args.model else slow_teacher()
    tokenizer = json.loads((model / "tokenizer_config.json").read_text())
    records = (RECORDS_TOKENIZER / "tokenizer.json").read_bytes() == (
        model / "tokenizer.json"
    ).read_bytes()
    scenarios = [s.strip() for s in args.scenarios.split(",")]
    if "2 trainers" in scenarios and not records:
        scenarios.remove("2 trainers")
        print("# 2 trainers skipped: the model's tokenizer is not the records task's")
    print(f"# bench_slow_teacher: {model}, requests {args.sequences} x {args.length} tokens, "
          f"closed loops of {args.seconds:g} s, {os.cpu_count()} CPUs "
          f"(tokenizer {tokenizer.get('tokenizer_class', '?')})\n", flush=True)  # fmt: skip
    print("| scenario | flags | answered | errors seen | refused (resent) | tokens/s | p50 s | "
          "p99 s | per caller min / max | sequences per forward | seconds |")  # fmt: skip
    print("|" + " --- |" * 11)
    configs = CONFIGS
    if args.config:
        configs = {
            name: flags.split() for name, _, flags in (c.partition("=") for c in args.config)
        }
    env = tree_env(dict(os.environ), args.server_tree)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-slow-") as tmp:
        for scenario in scenarios:
            for config, flags in configs.items():
                port, http_port = free_port(), free_port()
                command = [sys.executable, "-m", "teacher_service", "--log-level", "WARNING",
                           "serve", "--model", str(model), "--port", str(port), "--device",
                           "cpu", "--http-port", str(http_port), *flags]  # fmt: skip
                log = Path(tmp) / f"server-{port}.log"
                server = ServerProcess(
                    command, f"127.0.0.1:{port}", log, args.server_tree or ROOT, http_port
                )
                server.start(env)
                try:
                    with TeacherClient(server.address) as client:
                        vocab = client.info().vocab_size
                    before = batch_counters(http_port)
                    out = run_scenario(scenario, server.address, args, vocab, Path(tmp))
                    after = batch_counters(http_port)
                finally:
                    server.stop()
                counters = tuple(b - a for a, b in zip(before, after))
                rows.append(row(config, scenario, out, counters, args))
                print_row(rows[-1])
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": settings, "model": str(model), "rows": rows},
                                        indent=1))  # fmt: skip
    summarise(rows)


def print_row(r: dict) -> None:
    errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
    seconds = f"{r['seconds']:.0f}" + (f" ({r['note']})" if r["note"] else "")
    print(f"| {r['scenario']} | {r['config']} | {r['answered']} | {errors} | {r['refused']} | "
          f"{r['tokens_per_s']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
          f"{r['per_caller'][0]} / {r['per_caller'][1]} | {r['sequences_per_forward']:.1f} | "
          f"{seconds} |", flush=True)  # fmt: skip


def summarise(rows: list[dict]) -> None:
    """The targets, from the rows of the default flags (and admission off beside them)."""
    by = {(r["scenario"], r["config"]): r for r in rows}
    checks = []
    for scenario in ("stream", "unary"):
        if (scenario, "default") in by:
            checks.append((f"{scenario}: no errors seen", not by[scenario, "default"]["errors"]))
    four, one = by.get(("4 unary", "default")), by.get(("unary", "default"))
    if four:
        checks.append((f"4 unary: p99 / p50 = {four['p99'] / four['p50']:.2f} <= 3",
                       four["p99"] <= 3 * four["p50"]))  # fmt: skip
        low, high = four["per_caller"]
        checks.append((f"4 unary: calls per caller {low} - {high}, within 2x", high <= 2 * low))
    if four and one:
        gain = four["sequences_per_forward"] / one["sequences_per_forward"]
        checks.append((f"4 unary: sequences per forward {gain:.2f} x one caller's >= 3", gain >= 3))
    if ("2 trainers", "default") in by:
        checks.append(("2 trainers: both finish", not by["2 trainers", "default"]["errors"]))
    for scenario in ("stream", "unary", "4 unary", "raw 32"):
        if (scenario, "default") in by and (scenario, "admission off") in by:
            ratio = by[scenario, "default"]["tokens_per_s"] / max(
                by[scenario, "admission off"]["tokens_per_s"], 1e-9
            )
            checks.append((f"{scenario}: tokens/s default / admission off = {ratio:.2f} >= 0.9",
                           ratio >= 0.9))  # fmt: skip
    print()
    for text, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {text}")


if __name__ == "__main__":
    main()
