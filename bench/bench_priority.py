"""Why the model worker runs at a lower priority: a gRPC server that refuses every call at
once, sharing one core with a thread that computes without pause, as a forward does.

    .venv/bin/python bench/bench_priority.py        # ~1.5 minutes, needs 2 cores

Not a test: it prints one table. The server (grpc.aio, the service's proto) runs on CPU 0
and answers every `Score` with RESOURCE_EXHAUSTED and a 50 ms `retry-after` hint; 128
clients in 4 processes on CPU 1 (bench_load.py's) send and come back after the hint. What
shares CPU 0 with the server, one row each:

- nothing;
- a thread of the server's process running 512 x 512 matmuls (torch, one thread), at
  nice 0, then at nice 10 (`--worker-nice`'s default), then at nice 19;
- the same loop in a separate process, at nice 0: the same load on the core, but outside
  the server's process.

A refusal costs the server microseconds, but each call passes through several threads
before its handler runs (gRPC core's, the completion-queue poller, the event loop). Times
are of the calls after each client's first, as in bench_load.py's refusal column.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import percentile, run_level

from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_client.retry import RETRY_AFTER_KEY
from teacher_service.batcher import lower_thread_priority
from teacher_service.cli import free_port

CLIENTS, PROCESSES, SECONDS = 128, 4, 8.0
SERVER_CPU, CLIENT_CPUS = 0, {1}


def compute_for_ever(nice: int) -> None:
    lower_thread_priority(nice)
    a = torch.randn(512, 512)
    while True:
        a @ a


class Refuser(pb_grpc.TeacherServicer):
    async def Score(self, request, context):
        context.set_trailing_metadata(((RETRY_AFTER_KEY, "0.05"),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")


def serve(port: int, thread_nice: int | None) -> None:
    os.sched_setaffinity(0, {SERVER_CPU})
    torch.set_num_threads(1)  # for the whole process, as OMP_NUM_THREADS=1 sets it
    if thread_nice is not None:
        threading.Thread(target=compute_for_ever, args=(thread_nice,), daemon=True).start()

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_TeacherServicer_to_server(Refuser(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def busy_process() -> None:
    os.sched_setaffinity(0, {SERVER_CPU})
    torch.set_num_threads(1)
    compute_for_ever(0)


def main() -> None:
    if not {SERVER_CPU} | CLIENT_CPUS <= os.sched_getaffinity(0):
        sys.exit("bench_priority needs CPUs 0 and 1")
    spawn = multiprocessing.get_context("spawn")
    print("| sharing the server's core | refusals | p50 ms | p90 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    cases = [("nothing", None, False)]
    cases += [(f"a thread of the server, nice {n}", n, False) for n in (0, 10, 19)]
    cases += [("another process, nice 0", None, True)]
    for name, thread_nice, separate_process in cases:
        port = free_port()
        children = [spawn.Process(target=serve, args=(port, thread_nice))]
        if separate_process:
            children.append(spawn.Process(target=busy_process))
        for child in children:
            child.start()
        time.sleep(3.0)  # the server imports and listens
        os.sched_setaffinity(0, CLIENT_CPUS)  # the client processes inherit it
        try:
            out = run_level(f"127.0.0.1:{port}", CLIENTS, SECONDS, 100, PROCESSES)
        finally:
            for child in children:
                child.kill()
            os.sched_setaffinity(0, {SERVER_CPU} | CLIENT_CPUS)
        times = out.refused
        print(f"| {name} | {out.refusals} | {percentile(times, 0.5) * 1000:.1f} | "
              f"{percentile(times, 0.9) * 1000:.1f} | {percentile(times, 0.99) * 1000:.1f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
