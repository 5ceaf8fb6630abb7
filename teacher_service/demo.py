"""`make demo`: the teacher service end to end on the built-in tiny model.

Builds the tiny model (once, cached in .cache/), starts `teacher-service serve` as a
subprocess on loopback, checks the tokenizer handshake, scores a batch through the client,
generates a completion, prints a summary and shuts the service down with SIGTERM.
(The student trainer, the other half of on-policy distillation, is not built yet.)
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer
from transformers.utils import logging as transformers_logging

from teacher_service.client import TeacherClient, build_score_request
from teacher_service.tiny_model import build_tiny_model

PROMPTS = [
    "Ada has 12 apples. Ada gives away 3 of them to Ben, so Ben has 15.",
    "Cleo finds 7 coins.",
    "Dara sells 120 stamps to Emil, so Emil has 131.",
    "Fay counts 4 shells and 9 marbles.",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def run(model_dir: Path, top_k: int) -> None:
    transformers_logging.disable_progress_bar()
    if not (model_dir / "config.json").is_file():
        _step(f"building the tiny teacher model in {model_dir}")
        build_tiny_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    port = _free_port()
    _step(f"starting teacher-service on 127.0.0.1:{port}")
    server = subprocess.Popen(
        [sys.executable, "-m", "teacher_service", "--log-level", "WARNING", "serve",
         "--model", str(model_dir), "--port", str(port), "--device", "cpu"],
        env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )  # fmt: skip
    try:
        with TeacherClient(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_until_serving(timeout=120)
            info = client.check_tokenizer(tokenizer)
            _step(
                f"connected: model {info.model_id!r}, vocabulary {info.vocab_size}, "
                f"{info.device}/{info.model_dtype}; tokenizer fingerprints match"
            )
            sequences = [tokenizer(text)["input_ids"] for text in PROMPTS]
            started = time.perf_counter()
            results = client.score(sequences, 1, top_k=top_k, dtype="float16")
            elapsed = time.perf_counter() - started
            scored = sum(len(r.target_logprobs) for r in results)
            request_bytes = build_score_request(
                sequences, 1, top_k=top_k, dtype="float16"
            ).ByteSize()
            payload = sum(
                a.nbytes for r in results for a in (r.target_logprobs, r.topk_ids, r.topk_logprobs)
            )
            _step(f"scored {len(sequences)} sequences, {scored} positions, top_k={top_k}, float16")
            print(
                f"    round trip {elapsed * 1000:.1f} ms; request {request_bytes} bytes; response "
                f"tensors {payload / scored:.0f} bytes per scored position (raw, no JSON)"
            )
            for text, result in zip(PROMPTS, results):
                mean = float(np.mean(result.target_logprobs.astype(np.float32)))
                print(f"    mean log p(token) {mean:7.3f}   {text}")
            first = results[0]
            row = 3
            context = tokenizer.decode(sequences[0][: row + 1])
            top = ", ".join(
                f"{tokenizer.decode([int(i)])!r} {float(lp):.2f}"
                for i, lp in zip(first.topk_ids[row, :5], first.topk_logprobs[row, :5])
            )
            print(f"    after {context!r} the teacher's top 5: {top}")
            (completion,) = client.generate([sequences[1][:4]], max_new_tokens=12, seed=0)
            prompt_text = tokenizer.decode(sequences[1][:4], skip_special_tokens=True)
            new_text = tokenizer.decode(completion.token_ids)
            _step(
                f"sampled completion of {prompt_text!r}: {new_text!r} ({completion.finish_reason})"
            )
            print("    (random weights: the tiny teacher is untrained, so its text is noise)")
    finally:
        _step("stopping the service (SIGTERM)")
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    if code != 0:
        raise SystemExit(f"teacher-service exited with {code}")
    _step("done: the service shut down cleanly")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path(".cache/tiny-model"))
    parser.add_argument("--top-k", type=int, default=64)
    args = parser.parse_args()
    run(args.model, args.top_k)


if __name__ == "__main__":
    main()
