"""Load, overload, a cancel storm and a soak against one `teacher-service serve` process.

    .venv/bin/python bench/bench_load.py --quick          # ~1.5 minutes
    .venv/bin/python bench/bench_load.py                  # ~8 minutes (a 5-minute soak)

Not a test: it prints one table per run. Every client is a raw gRPC stub on asyncio (no
retries: each refusal is seen and timed), sending 4 sequences of 64 tokens (top_k 8) and,
when refused, coming back after the server's `retry-after` hint, as TeacherClient does. A
level's clients are spread over --client-processes processes (default 4), as separate
trainers are: 128 clients in one process time their own interpreter's queue too.

- levels: 1 / 8 / 32 / 128 concurrent clients: admitted requests/s and tokens/s, p50/p99
  of admitted requests, refusals and their p99 as the clients saw them and as the server
  timed them (its request-time histogram: a bucket bound), the server's longest garbage
  collection (a bound: every thread waits for one), the server's RSS before and after.
  Every client of a level starts at the same instant on a fresh connection: the refusals
  of those first calls (a herd no steady load makes: the server takes the calls one after
  another) are timed apart from the rest, as their count and slowest.
  Targets with the defaults: at 128 clients the admitted p99 <= 3 x the 8-client p99 of
  the same run; refusals answered within 50 ms p99.
- cancel storm: 50 clients whose calls have a 0.2 s deadline, resending at once, and one
  live client (no deadline): the wasted-compute fraction is the server's own count,
  sequences computed whose caller had gone / all computed (target <= 10 %), from /metrics.
- soak: 8 clients for --soak-seconds (default 300), the server's RSS every 30 s.

The model defaults to models/translation/teacher (the checked-in demo teacher), else the
tiny model bench_service.py builds; `--model tiny` is the tests' 64-wide model, so fast
that 2 cores' gRPC, not the forward, is the bottleneck. On a shared machine the figures
are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import ROOT, ServerProcess, bench_spec, ensure_bench_model, scrape_metrics

from distill_lab.tiny_model import build_tiny_model
from teacher_client.proto import teacher_pb2 as pb
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_client.retry import BACKPRESSURE_JITTER, RETRY_AFTER_KEY
from teacher_service.cli import free_port

SEQUENCES, LENGTH, TOP_K = 4, 64, 8


@dataclass
class Outcomes:
    admitted: list[float] = field(default_factory=list)  # seconds, per answered request
    refused: list[float] = field(default_factory=list)  # seconds until the refusal came
    refused_first: list[float] = field(default_factory=list)  # the same, for first calls
    failed: dict[str, int] = field(default_factory=dict)  # other codes

    @property
    def refusals(self) -> int:
        return len(self.refused) + len(self.refused_first)

    def fail(self, code: grpc.StatusCode) -> None:
        self.failed[code.name] = self.failed.get(code.name, 0) + 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(rng: random.Random, vocab: int) -> pb.ScoreRequest:
    sequences = [
        pb.Sequence(token_ids=[rng.randrange(3, vocab) for _ in range(LENGTH)], score_from=1)
        for _ in range(SEQUENCES)
    ]
    return pb.ScoreRequest(sequences=sequences, top_k=TOP_K)


def hint(error: grpc.aio.AioRpcError) -> float | None:
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            return float(value)
    return None


async def client(
    stub: pb_grpc.TeacherStub,
    until: float,
    out: Outcomes,
    seed: int,
    vocab: int,
    timeout: float | None = None,
) -> None:
    """Send until `until`; after a refusal, wait the hint (jittered like TeacherClient)."""
    rng = random.Random(seed)
    first = True
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            await stub.Score(request(rng, vocab), timeout=timeout)
            out.admitted.append(time.monotonic() - started)
        except grpc.aio.AioRpcError as error:
            retry_after = hint(error)
            if retry_after is not None:
                (out.refused_first if first else out.refused).append(time.monotonic() - started)
                await asyncio.sleep(retry_after * rng.uniform(1, 1 + BACKPRESSURE_JITTER))
            else:
                out.fail(error.code())
        first = False


async def run_clients(
    address: str, n: int, seconds: float, vocab: int, first_seed: int = 0, **kw
) -> Outcomes:
    out = Outcomes()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.TeacherStub(channel)
        until = time.monotonic() + seconds
        seeds = range(first_seed, first_seed + n)
        await asyncio.gather(*(client(stub, until, out, s, vocab, **kw) for s in seeds))
    return out


def _clients_process(address, n, seconds, vocab, first_seed, start, results) -> None:
    start.wait()  # every process has imported: the level starts in one instant, as the bench says
    results.put(asyncio.run(run_clients(address, n, seconds, vocab, first_seed)))


def run_level(address: str, n: int, seconds: float, vocab: int, processes: int) -> Outcomes:
    """n clients spread over `processes` processes (as n trainers are): one asyncio process
    of many clients adds its own queueing (its gRPC threads share one interpreter)."""
    processes = max(1, min(processes, n))
    if processes == 1:
        return asyncio.run(run_clients(address, n, seconds, vocab))
    spawn = multiprocessing.get_context("spawn")  # no fork after gRPC has run here
    start, results = spawn.Barrier(processes + 1), spawn.Queue()
    shares = [n // processes + (i < n % processes) for i in range(processes)]
    workers = [
        spawn.Process(
            target=_clients_process,
            args=(address, share, seconds, vocab, sum(shares[:i]), start, results),
        )
        for i, share in enumerate(shares)
    ]
    for worker in workers:
        worker.start()
    start.wait()
    merged = Outcomes()
    for _ in workers:
        out = results.get()
        merged.admitted += out.admitted
        merged.refused += out.refused
        merged.refused_first += out.refused_first
        for code, count in out.failed.items():
            merged.failed[code] = merged.failed.get(code, 0) + count
    for worker in workers:
        worker.join()
    return merged


def level_row(
    n: int, out: Outcomes, seconds: float, timed: tuple[str, str], rss: tuple[float, float]
) -> str:
    """One level's table row; `timed`: the server's refusal p99 and longest GC pause."""
    tokens = len(out.admitted) * SEQUENCES * LENGTH / seconds
    failed = ",".join(f"{k}:{v}" for k, v in out.failed.items()) or "-"
    return (
        f"| {n} | {len(out.admitted) / seconds:.1f} | {tokens:.0f} | "
        f"{percentile(out.admitted, 0.5) * 1000:.0f} | "
        f"{percentile(out.admitted, 0.99) * 1000:.0f} | "
        f"{out.refusals} | {percentile(out.refused, 0.99) * 1000:.1f} | "
        f"{len(out.refused_first)} / {max(out.refused_first, default=0) * 1000:.0f} | "
        f"{percentile(out.refused + out.refused_first, 0.99) * 1000:.1f} | "
        f"{timed[0]} | {timed[1]} | {failed} | {rss[0]:.0f} -> {rss[1]:.0f} |"
    )


def counters(http_port: int) -> dict[str, float]:
    """The server's sequence counters and histogram buckets (scrape_metrics keeps token
    counters only)."""
    found = scrape_metrics(http_port) or {}
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(("teacher_sequences_", "teacher_request_seconds_bucket",
                                "teacher_gc_pause_seconds_bucket")):  # fmt: skip
                name, _, value = line.rpartition(" ")
                found[name] = float(value)
    return found


def bucket_bound(
    before: dict[str, float], after: dict[str, float], histogram: str, q: float, **wanted: str
) -> str:
    """The bucket bound under which a fraction q of a histogram's observations in a level
    fell (summed over the labels not in `wanted`), as "<= N" ms."""
    buckets: dict[float, float] = {}
    for name, count in after.items():
        if name.startswith(f"{histogram}_bucket{{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', name))
            if all(labels.get(k) == v for k, v in wanted.items()):
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + count - before.get(name, 0.0)
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0.0
    bound = next((le for le, count in ordered if total and count >= q * total), None)
    return "" if bound is None else f"<= {bound * 1000:g}"


def server_refusal_p99(before: dict[str, float], after: dict[str, float]) -> str:
    """The bound under which 99 % of the refusals of a level were answered, as the server
    timed them (handler start to answer: no transport, no client)."""
    return bucket_bound(before, after, "teacher_request_seconds", 0.99,
                        frontend="grpc", method="Score", status="RESOURCE_EXHAUSTED")  # fmt: skip


def longest_gc_pause(before: dict[str, float], after: dict[str, float]) -> str:
    """The bound over every garbage collection of a level: no thread of the server runs
    Python meanwhile (teacher_service/heap.py)."""
    return bucket_bound(before, after, "teacher_gc_pause_seconds", 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short levels, storm and soak")
    parser.add_argument(
        "--model",
        type=Path,
        default=ROOT / "models/translation/teacher",
        help="a model directory, or tiny: the tests' 64-wide model (fast enough that the "
        "transport is the bottleneck)",
    )
    parser.add_argument("--level-seconds", type=float, default=20.0)
    parser.add_argument("--storm-seconds", type=float, default=20.0)
    parser.add_argument("--soak-seconds", type=float, default=300.0)
    parser.add_argument("--rss-every", type=float, default=30.0)
    parser.add_argument("--levels", default="1,8,32,128")
    parser.add_argument("--server-flags", default="", help="extra `serve` flags, one string")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=4,
        help="spread each level's clients over this many processes (1: one asyncio process)",
    )
    parser.add_argument(
        "--server-cpus",
        default="",
        help="pin the server to these CPUs (e.g. 0) and the clients to the others, so the "
        "clients do not take the server's cores (default: all share every core)",
    )
    args = parser.parse_args()
    if args.quick:
        args.level_seconds, args.storm_seconds = 6.0, 8.0
        args.soak_seconds, args.rss_every = 20.0, 5.0
    model = args.model
    if str(model) == "tiny":  # a model so fast that 2 cores' gRPC, not the forward, is the limit
        model = ROOT / ".cache" / "tiny-model"
        if not (model / "config.json").is_file():
            build_tiny_model(model)
    elif not model.exists():
        model = ensure_bench_model(bench_spec(argparse.Namespace(
            vocab_size=4000, hidden_size=384, layers=6)))  # fmt: skip
    port, http_port = free_port(), free_port()
    command = [sys.executable, "-m", "teacher_service", "--log-level", "WARNING", "serve",
               "--model", str(model), "--port", str(port), "--device", "cpu",
               "--http-port", str(http_port), *args.server_flags.split()]  # fmt: skip
    env, where = dict(os.environ), "every core shared by server and clients"
    if args.server_cpus:
        server_cpus = {int(c) for c in args.server_cpus.split(",")}
        client_cpus = os.sched_getaffinity(0) - server_cpus
        command = ["taskset", "-c", args.server_cpus, *command]
        env["OMP_NUM_THREADS"] = str(len(server_cpus))  # torch's threads: one per CPU it has
        os.sched_setaffinity(0, client_cpus)
        where = f"server on CPUs {sorted(server_cpus)}, clients on {sorted(client_cpus)}"
    log_path = Path(tempfile.gettempdir()) / f"bench-load-server-{port}.log"
    server = ServerProcess(command, f"127.0.0.1:{port}", log_path, http_port=http_port)
    server.start(env)
    pid = server.process.pid
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/info") as reply:
            vocab = int(json.loads(reply.read())["vocab_size"])
        print(f"# bench_load: {model}, flags [{args.server_flags}], {where}, clients in "
              f"{args.client_processes} processes\n")  # fmt: skip
        asyncio.run(run_clients(server.address, 4, 3.0, vocab))  # warm-up: measured throughput
        print("| clients | admitted req/s | tokens/s | p50 ms | p99 ms | refused | "
              "refusal p99 ms (after first calls) | first calls refused / slowest ms | "
              "refusal p99 ms (all calls) | server's refusal p99 ms | server's longest GC "
              "pause ms | other errors | RSS MiB before -> after |")  # fmt: skip
        print("|" + " --- |" * 13)
        p99 = {}
        for n in (int(x) for x in args.levels.split(",")):
            before, seen = rss_mib(pid), counters(http_port)
            out = run_level(server.address, n, args.level_seconds, vocab, args.client_processes)
            after = counters(http_port)
            timed = (server_refusal_p99(seen, after), longest_gc_pause(seen, after))
            rss = (before, rss_mib(pid))
            print(level_row(n, out, args.level_seconds, timed, rss), flush=True)
            p99[n] = percentile(out.admitted, 0.99)
            time.sleep(2.0)  # let the queue drain between levels
        if 8 in p99 and 128 in p99:
            print(f"\n128-client admitted p99 / 8-client p99 = {p99[128] / p99[8]:.2f} (<= 3)")

        async def storm() -> tuple[Outcomes, Outcomes]:
            live = run_clients(server.address, 1, args.storm_seconds, vocab)
            short = run_clients(server.address, 50, args.storm_seconds, vocab, timeout=0.2)
            return await asyncio.gather(live, short)

        base = counters(http_port)
        live, short = asyncio.run(storm())
        after = counters(http_port)
        delta = {k: after.get(k, 0.0) - base.get(k, 0.0) for k in after}
        computed = delta.get("teacher_sequences_computed_total", 0.0)
        wasted = delta.get("teacher_sequences_wasted_total", 0.0)
        print("\n| cancel storm | computed seqs | wasted seqs | wasted fraction | dropped "
              "expired | dropped cancelled | short calls ok / refused / deadline | live p50 "
              "ms | live p99 ms |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        expired = delta.get('teacher_sequences_dropped_total{reason="expired"}', 0.0)
        cancelled = delta.get('teacher_sequences_dropped_total{reason="cancelled"}', 0.0)
        deadline = short.failed.get("DEADLINE_EXCEEDED", 0)
        print(f"| 50 x 0.2 s + 1 live | {computed:.0f} | {wasted:.0f} | "
              f"{wasted / max(computed, 1):.1%} | {expired:.0f} | {cancelled:.0f} | "
              f"{len(short.admitted)} / {short.refusals} / {deadline} | "
              f"{percentile(live.admitted, 0.5) * 1000:.0f} | "
              f"{percentile(live.admitted, 0.99) * 1000:.0f} |", flush=True)  # fmt: skip

        print(f"\n| soak ({args.soak_seconds:.0f} s, 8 clients) | RSS MiB |")
        print("| --- | --- |")
        print(f"| 0 s | {rss_mib(pid):.0f} |", flush=True)

        async def soak() -> Outcomes:
            task = asyncio.ensure_future(run_clients(server.address, 8, args.soak_seconds, vocab))
            started = time.monotonic()
            while not task.done():
                await asyncio.wait([task], timeout=args.rss_every)
                print(f"| {time.monotonic() - started:.0f} s | {rss_mib(pid):.0f} |", flush=True)
            return task.result()

        soaked = asyncio.run(soak())
        print(f"\nsoak: {len(soaked.admitted)} answered, {soaked.refusals} refused, "
              f"other errors {soaked.failed or 'none'}")  # fmt: skip
    finally:
        server.stop()


if __name__ == "__main__":
    main()
