"""Benchmark the front ends side by side: gRPC, native HTTP (msgpack and JSON) and the
vLLM/OpenAI `/v1/completions` dialect with `prompt_logprobs`, on one server process.

    .venv/bin/python bench/bench_http.py            # ~2 minutes on 2 CPU cores
    .venv/bin/python bench/bench_http.py --quick

Every measurement scores the same batch (16 x 256 random tokens, score_from 1, top_k 64)
with one unary request at a time, so the differences are encoding, transport and
decoding: gRPC and msgpack carry raw float16 bytes, JSON carries decimal text. The
completions request is shaped like TRL's VLLMClient.get_sequence_logprobs (token-id
prompts, max_tokens 1, prompt_logprobs 64), so it also samples one token per prompt.
Rounds alternate the front ends; the table reports medians and bytes per scored token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import grpc
import httpx
import msgpack
import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import ServerProcess, bench_spec, ensure_bench_model

from teacher_client import build_score_request
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_service.cli import free_port, serve_command

MSGPACK = "application/msgpack"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batch_size, args.seq_len = 3, 8, 128
    hf_logging.disable_progress_bar()
    model_dir = ensure_bench_model(bench_spec(args))
    batch = torch.randint(
        3,
        args.vocab_size,
        (args.batch_size, args.seq_len),
        generator=torch.Generator().manual_seed(0),
    ).tolist()
    positions = args.batch_size * (args.seq_len - 1)
    grpc_port, http_port = free_port(), free_port()
    server = ServerProcess(
        serve_command(
            model_dir,
            grpc_port,
            "--http-port",
            str(http_port),
            "--max-batch-tokens",
            str(positions),
        ),
        f"127.0.0.1:{grpc_port}",
        Path("runs") / "bench-http-server.log",
    )
    server.log_path.parent.mkdir(exist_ok=True)
    server.start(dict(os.environ))
    url = f"http://127.0.0.1:{http_port}"
    limit = [("grpc.max_receive_message_length", 256 * 2**20)]
    channel = grpc.insecure_channel(server.address, options=limit)
    stub = pb_grpc.TeacherStub(channel)
    http = httpx.Client(timeout=600)
    native = {
        "sequences": [{"token_ids": s, "score_from": 1} for s in batch],
        "top_k": args.top_k,
        "dtype": "float16",
    }
    completions = {
        "prompt": batch,
        "max_tokens": 1,
        "temperature": 1.0,
        "prompt_logprobs": args.top_k,
    }
    grpc_request = build_score_request(batch, 1, top_k=args.top_k, dtype="float16")

    def grpc_call() -> int:
        return stub.Score(grpc_request, timeout=600).ByteSize()

    def msgpack_call() -> int:
        answer = http.post(
            f"{url}/v1/score",
            content=msgpack.packb(native),
            headers={"content-type": MSGPACK, "accept": MSGPACK},
        )
        answer.raise_for_status()
        return len(answer.content)

    def json_call() -> int:
        answer = http.post(f"{url}/v1/score", json=native)
        answer.raise_for_status()
        return len(answer.content)

    def completions_call() -> int:
        answer = http.post(f"{url}/v1/completions", json=completions)
        answer.raise_for_status()
        return len(answer.content)

    calls = {
        "gRPC Score (float16)": grpc_call,
        "HTTP /v1/score msgpack (float16)": msgpack_call,
        "HTTP /v1/score JSON": json_call,
        "HTTP /v1/completions prompt_logprobs (JSON)": completions_call,
    }
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    sizes: dict[str, int] = {}
    try:
        for call in calls.values():  # warm up
            call()
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", flush=True)
            for name, call in calls.items():
                started = time.perf_counter()
                sizes[name] = call()
                seconds[name].append(time.perf_counter() - started)
    finally:
        channel.close()
        http.close()
        server.stop()
    base = statistics.median(seconds["gRPC Score (float16)"])
    print(
        f"\nbatch {args.batch_size} x {args.seq_len} ({positions} scored positions), "
        f"top_k {args.top_k}, model {model_dir.name}, medians of {args.rounds} rounds"
    )
    print(f"{'front end':46s} {'tokens/s':>10s} {'vs gRPC':>8s} {'bytes/token':>12s}")
    results = {}
    for name in calls:
        median = statistics.median(seconds[name])
        results[name] = {
            "tokens_per_s": positions / median,
            "vs_grpc": base / median,
            "bytes_per_token": sizes[name] / positions,
        }
        row = results[name]
        print(
            f"{name:46s} {row['tokens_per_s']:10.0f} {row['vs_grpc']:8.2f} "
            f"{row['bytes_per_token']:12.1f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2
            )
        )


if __name__ == "__main__":
    main()
