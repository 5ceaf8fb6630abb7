"""A fleet that starts in one instant: 128 clients' first calls against a server that has
just started, every call refused, the server alone on one core.

    .venv/bin/python bench/bench_herd.py        # ~2.5 minutes, needs 2 cores

Not a test: it prints one table. Each row starts a fresh server on CPU 0 and 128 clients in
4 processes on CPU 1; each client opens its connection first, then all send one `Score`
in the same instant, and each is refused (RESOURCE_EXHAUSTED with a retry hint). Every
server process imports the service (torch, transformers): the same heap in every row.

- grpc.aio with a handler that only refuses: the transport's own cost;
- the service's front door (grpc_api.start_grpc: its interceptor, call cap, metrics and
  error table) over an engine that refuses every call;

each with the heap as start-up left it, then with it frozen (heap.freeze), as
`teacher-service serve` does.

Columns: the first calls' latency as the clients saw it (min / median / max over the
rows' runs) and the server's longest garbage collection during the herd: no thread runs
Python meanwhile. bench_load.py's levels show the same herd on a warm server.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import request
from bench_priority import Refuser  # refuses every Score with a 0.05 s hint

from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_service.batcher import BatcherOverloaded
from teacher_service.cli import free_port
from teacher_service.config import ServerConfig
from teacher_service.frontends.grpc_api import start_grpc
from teacher_service.heap import CollectionTimer, freeze
from teacher_service.metrics import ServiceMetrics

CLIENTS, PROCESSES, RUNS = 128, 4, 3
SERVER_CPU, CLIENT_CPUS = 0, {1}
RETRY_AFTER = 0.05  # as bench_priority's Refuser hints
FROZEN = ", heap frozen"


class RefusingEngine:
    """What grpc_api's servicer calls, refusing every request as a full queue does."""

    def __init__(self) -> None:
        self.metrics = ServiceMetrics()

    async def score(self, request):
        raise BatcherOverloaded("the teacher's queue is full", retry_after=RETRY_AFTER)


async def start(kind: str, port: int) -> grpc.aio.Server:
    if kind.startswith("grpc.aio"):
        server = grpc.aio.server()
        pb_grpc.add_TeacherServicer_to_server(Refuser(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
    else:
        server, _, _ = await start_grpc(RefusingEngine(), ServerConfig(model="-", port=port))
    if kind.endswith(FROZEN):
        freeze()
    return server


def serve(kind: str, port: int, done, pauses) -> None:
    os.sched_setaffinity(0, {SERVER_CPU})
    longest = [0.0]
    timer = CollectionTimer(lambda _, seconds: longest.__setitem__(0, max(longest[0], seconds)))

    async def main() -> None:
        server = await start(kind, port)
        longest[0] = 0.0  # start-up's own collections are not the herd's
        await asyncio.get_running_loop().run_in_executor(None, done.wait)
        await server.stop(None)

    asyncio.run(main())
    timer.close()
    pauses.put(longest[0])


def clients(port: int, n: int, first_seed: int, barrier, results) -> None:
    async def main() -> list[float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await channel.channel_ready()
            stub = pb_grpc.TeacherStub(channel)
            requests = [request(random.Random(first_seed + i), 100) for i in range(n)]
            await asyncio.get_running_loop().run_in_executor(None, barrier.wait)

            async def one(message) -> float:
                started = time.monotonic()
                try:
                    await stub.Score(message)
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                return time.monotonic() - started

            return await asyncio.gather(*(one(m) for m in requests))

    results.put(asyncio.run(main()))


def herd(kind: str) -> tuple[list[float], float]:
    """One fresh server, one herd: the first calls' latencies and the longest GC pause."""
    spawn = multiprocessing.get_context("spawn")
    port, done, pauses, results = free_port(), spawn.Event(), spawn.Queue(), spawn.Queue()
    server = spawn.Process(target=serve, args=(kind, port, done, pauses))
    server.start()
    os.sched_setaffinity(0, CLIENT_CPUS)  # the client processes inherit it
    try:
        barrier = spawn.Barrier(PROCESSES + 1)
        share = CLIENTS // PROCESSES
        workers = [
            spawn.Process(target=clients, args=(port, share, i * share, barrier, results))
            for i in range(PROCESSES)
        ]
        for worker in workers:
            worker.start()
        barrier.wait()  # every client is connected: the herd leaves now
        latencies = [t for _ in workers for t in results.get(timeout=60)]
        for worker in workers:
            worker.join()
        done.set()
        longest = pauses.get(timeout=60)
        server.join(30)
    finally:
        if server.is_alive():
            server.kill()
        os.sched_setaffinity(0, {SERVER_CPU} | CLIENT_CPUS)
    return latencies, longest


def main() -> None:
    if not {SERVER_CPU} | CLIENT_CPUS <= os.sched_getaffinity(0):
        sys.exit("bench_herd needs CPUs 0 and 1")
    gc.collect()
    print(f"| server (fresh, on CPU {SERVER_CPU}), {CLIENTS} first calls at once | "
          "min ms | median ms | max ms, each run | longest GC pause ms, each run |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for kind in ("grpc.aio", "grpc.aio" + FROZEN, "front door", "front door" + FROZEN):
        runs = [herd(kind) for _ in range(RUNS)]
        everything = sorted(t for latencies, _ in runs for t in latencies)
        maxima = " / ".join(f"{max(latencies) * 1000:.0f}" for latencies, _ in runs)
        pauses = " / ".join(f"{longest * 1000:.1f}" for _, longest in runs)
        print(f"| {kind} | {everything[0] * 1000:.1f} | "
              f"{everything[len(everything) // 2] * 1000:.1f} | {maxima} | {pauses} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
