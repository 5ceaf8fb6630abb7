"""2,000 ScoreStreams of random valid, invalid and undecodable messages against a real
service: does every stream end, with the status the contract gives it, and no traceback?

    .venv/bin/python bench/bench_stream_fuzz.py            # ~1 minute on 2 cores

Not a test: it prints one table. A `teacher-service serve` process (the tiny model, CPU,
admission off) runs with its stderr captured; 16 threads send streams of 1-6 messages
(tests/stream_mix.py: valid, bad field values, bytes that are not a ScoreRequest), raw
bytes over a generic `stream_stream`, each with a generous deadline. Counted: hangs (no
status within the deadline), final statuses by code, streams whose answers or status
differ from the contract, tracebacks in the service's log, and the time from a stream's
start to its final status (p50 / p99).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from distill_lab.tiny_model import build_tiny_model  # noqa: E402
from teacher_client import TeacherClient  # noqa: E402
from teacher_service.cli import free_port, serve_command  # noqa: E402
from tests.stream_mix import Kind, Outcome, encode, expected, run_stream  # noqa: E402

KINDS: list[Kind] = ["valid", "bad", "undecodable"]
WEIGHTS = [5, 3, 2]
MAX_MESSAGES, THREADS, CHANNELS = 6, 16, 4


def mix(rng: random.Random) -> list[Kind]:
    return rng.choices(KINDS, WEIGHTS, k=rng.randint(1, MAX_MESSAGES))


def one_stream(channel: grpc.Channel, kinds: list[Kind], seed: int, deadline: float):
    rng = random.Random(seed)
    messages = [encode(kind, n, rng.randrange(100)) for n, kind in enumerate(kinds)]
    return kinds, run_stream(channel, messages, deadline)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(results: list[tuple[list[Kind], Outcome]], log: str, deadline: float) -> None:
    hangs = sum(o.code == grpc.StatusCode.DEADLINE_EXCEEDED for _, o in results)
    wrong = [(k, o) for k, o in results if (o.answers, o.code) != expected(k)]
    codes = Counter(o.code.name for _, o in results)
    seconds = [o.seconds for _, o in results]
    print(f"streams                           {len(results)}")
    print(f"hangs (no status within {deadline:.0f} s)     {hangs}")
    print("final status                      " + ", ".join(f"{c} {n}" for c, n in codes.items()))
    print(f"answers or status off contract    {len(wrong)}")
    print(f"tracebacks in the service's log   {log.count('Traceback (most recent call last)')}")
    print(f"time to final status p50 / p99    {percentile(seconds, 0.5) * 1e3:.1f} / "
          f"{percentile(seconds, 0.99) * 1e3:.1f} ms")  # fmt: skip
    for kinds, outcome in wrong[:5]:
        print(f"  e.g. {kinds}: {outcome.code.name} {outcome.details!r}, {outcome.answers}")
    marker = "Traceback (most recent call last)"
    if marker in log:  # the first one's context, for the cause
        start = log.index(marker)
        print("\nthe service's first traceback:\n" + log[max(0, start - 300) : start + 3000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds, per stream")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    mixes = [mix(rng) for _ in range(args.streams)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, port = build_tiny_model(Path(tmp) / "model"), free_port()
        log_path = Path(tmp) / "service.log"
        with log_path.open("w") as log_file:
            # admission off: a valid message's answer is its scores, never back-pressure
            command = serve_command(model_dir, port, "--max-queue-forwards", "inf")
            service = subprocess.Popen(command, stderr=log_file)
        try:
            address = f"127.0.0.1:{port}"
            with TeacherClient(address, timeout=60) as client:
                client.wait_until_serving(timeout=120)
            channels = [grpc.insecure_channel(address) for _ in range(CHANNELS)]
            with ThreadPoolExecutor(THREADS) as pool:
                jobs = [
                    pool.submit(one_stream, channels[n % CHANNELS], kinds, n, args.deadline)
                    for n, kinds in enumerate(mixes)
                ]
                results = [job.result() for job in jobs]
            for channel in channels:
                channel.close()
        finally:
            service.terminate()
            service.wait(60)
        report(results, log_path.read_text(), args.deadline)


if __name__ == "__main__":
    main()
