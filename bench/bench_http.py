"""Benchmark the front ends side by side: gRPC, native HTTP (msgpack and JSON) and the
vLLM/OpenAI `/v1/completions` dialect with `prompt_logprobs`, on one server process.

    .venv/bin/python bench/bench_http.py            # ~2 minutes on 2 CPU cores
    .venv/bin/python bench/bench_http.py --quick
    .venv/bin/python bench/bench_http.py --remote --model models/translation/teacher

`--remote` adds the path of a teacher served by vLLM or SGLang: a second service with
`--backend openai --upstream` the first one's HTTP port (its `/v1/completions` stands in
for vLLM's), called over gRPC. Against plain gRPC that row costs what the remote path adds
around the upstream's forward: the upstream's JSON rendering, the extra hop, and the front
service's JSON parsing into tensors; the bytes of that hop are printed too.

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
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import ServerProcess, bench_spec, ensure_bench_model

import teacher_client
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_service.backend_api import ScoreItem
from teacher_service.cli import free_port, serve_command
from teacher_service.remote import _scores_from_prompt_logprobs
from teacher_service.scoring import ScoreOptions

MSGPACK = "application/msgpack"
GRPC = "gRPC Score (float16)"
COMPLETIONS = "HTTP /v1/completions prompt_logprobs (JSON)"
REMOTE = "gRPC -> --backend openai -> /v1/completions"


def parse_seconds(body: bytes, batch: list[list[int]], top_k: int, reps: int = 3) -> float:
    """What the openai backend does with the upstream's answer (JSON -> rows), in-process:
    the median of `reps` runs."""
    options = ScoreOptions(top_k=top_k, dtype=torch.float16)
    items = [ScoreItem(torch.tensor(ids), 1, options) for ids in batch]
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        choices = sorted(json.loads(body)["choices"], key=lambda c: c["index"])
        for item, choice in zip(items, choices):
            _scores_from_prompt_logprobs(item, choice["prompt_logprobs"])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


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
    parser.add_argument(
        "--model", type=Path, help="a model directory to serve instead of the benchmark Llama"
    )
    parser.add_argument(
        "--remote",
        action="store_true",
        help="also a second service with --backend openai in front of the first one's "
        "/v1/completions, called over gRPC (the vLLM/SGLang path)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batch_size, args.seq_len = 3, 8, 128
    hf_logging.disable_progress_bar()
    model_dir = args.model or ensure_bench_model(bench_spec(args))
    if args.model:
        args.vocab_size = len(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
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
    front = None
    if args.remote:  # the tokenizer is the model directory's own
        front_port = free_port()
        front = ServerProcess(
            serve_command(
                model_dir,
                front_port,
                "--backend",
                "openai",
                "--upstream",
                url,
                "--max-batch-tokens",
                str(positions),
            ),
            f"127.0.0.1:{front_port}",
            Path("runs") / "bench-http-front.log",
        )
        try:
            front.start(dict(os.environ))
        except BaseException:
            server.stop()
            raise
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
    options = teacher_client.ScoreOptions(top_k=args.top_k, dtype="float16")
    grpc_request = teacher_client.build_score_request(batch, 1, options)

    def grpc_call() -> int:
        return stub.Score(grpc_request, timeout=600).ByteSize()

    front_channel = None
    if front is not None:
        front_channel = grpc.insecure_channel(front.address, options=limit)
        front_stub = pb_grpc.TeacherStub(front_channel)

        def remote_call() -> int:
            return front_stub.Score(grpc_request, timeout=600).ByteSize()

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
        GRPC: grpc_call,
        "HTTP /v1/score msgpack (float16)": msgpack_call,
        "HTTP /v1/score JSON": json_call,
        COMPLETIONS: completions_call,
    }
    if front is not None:
        calls[REMOTE] = remote_call
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
        if front is not None:  # the upstream hop: the very body OpenAIBackend sends
            model_id = http.get(f"{url}/v1/models").json()["data"][0]["id"]
            body = http.post(f"{url}/v1/completions", json={"model": model_id, **completions})
            upstream_bytes = len(body.content)
            parsing = parse_seconds(body.content, batch, args.top_k)
    finally:
        channel.close()
        http.close()
        server.stop()
        if front is not None:
            front_channel.close()
            front.stop()
    base = statistics.median(seconds[GRPC])
    print(
        f"\nbatch {args.batch_size} x {args.seq_len} ({positions} scored positions), "
        f"top_k {args.top_k}, model {model_dir.name}, medians of {args.rounds} rounds"
    )
    print(f"{'front end':50s} {'tokens/s':>10s} {'vs gRPC':>8s} {'bytes/token':>12s}")
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
            f"{name:50s} {row['tokens_per_s']:10.0f} {row['vs_grpc']:8.2f} "
            f"{row['bytes_per_token']:12.1f}"
        )
    if front is not None:
        per_1k = {name: statistics.median(seconds[name]) / positions * 1e6 for name in calls}
        rendering = per_1k[COMPLETIONS] - per_1k[GRPC]
        front_cost = per_1k[REMOTE] - per_1k[COMPLETIONS]
        hop = upstream_bytes / positions
        results[REMOTE] |= {
            "upstream_bytes_per_token": hop,
            "upstream_json_ms_per_1k_tokens": rendering,
            "front_ms_per_1k_tokens": front_cost,
        }
        print(
            f"\n{REMOTE}: the client's hop carries gRPC's bytes, the upstream hop {hop:.1f} "
            f"bytes/token (JSON). Per 1000 scored tokens: the forward + gRPC {per_1k[GRPC]:.1f} "
            f"ms; the upstream's JSON dialect {rendering:+.1f} ms; the front service (the "
            f"second hop, JSON parsed into tensors, gRPC again) {front_cost:+.1f} ms, of "
            f"which parsing the JSON into tensors {parsing / positions * 1e6:.1f} ms"
        )
        results[REMOTE]["parse_ms_per_1k_tokens"] = parsing / positions * 1e6
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {
                        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    },
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
