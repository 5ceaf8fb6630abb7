"""What `serve --deterministic` costs: the records teacher scoring trainer-shaped batches
in the default mode (padded, packed, shared prefixes, one forward per batch) and in the
batch-invariant mode (every sequence in a forward of its own), side by side in one run.

    .venv/bin/python bench/bench_deterministic.py                 # ~1 minute on 2 CPU cores
    .venv/bin/python bench/bench_deterministic.py --model models/records/teacher --rounds 5

Not a test: it prints one table. Batches are the records task's validation prompts with
their reference answers (scored from the answer on, top-k 64 in float16, as a trainer
asks): B distinct prompts, and B / 4 prompts with 4 samples each (a shared prefix). The
two modes alternate round by round, so a machine's drift hits both; the figure is the
median round's scored tokens per second, and the ratio deterministic / default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "teacher-client")]

from student_trainer.config import TaskConfig  # noqa: E402
from student_trainer.data import encode_answer, prompt_ids, task_splits  # noqa: E402
from teacher_client import ScoreOptions  # noqa: E402
from teacher_service import scoring  # noqa: E402
from teacher_service.backend import HFBackend  # noqa: E402
from teacher_service.backend_api import ScoreItem  # noqa: E402

OPTIONS = scoring.ScoreOptions.from_client(ScoreOptions(top_k=64, dtype="float16"))


def workloads(tokenizer, batch: int) -> dict[str, list[ScoreItem]]:
    examples = task_splits(TaskConfig(name="records"), tokenizer).validation
    pairs = [(prompt_ids(tokenizer, e), encode_answer(tokenizer, e.answer)) for e in examples]

    def items(chosen: list[tuple[list[int], list[int]]]) -> list[ScoreItem]:
        return [ScoreItem(torch.tensor(p + a), len(p), OPTIONS) for p, a in chosen]

    shared = [pairs[i] for i in range(batch // 4) for _ in range(4)]
    return {
        f"{batch} prompts": items(pairs[:batch]),
        f"{batch // 4} prompts x 4 samples": items(shared),
    }


def tokens_per_s(backend: HFBackend, items: list[ScoreItem]) -> float:
    started = time.perf_counter()
    scores = backend.score_batch(items).scores
    elapsed = time.perf_counter() - started
    return sum(int(s.target_logprobs.numel()) for s in scores) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models/records/teacher"))
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    default = HFBackend.load(args.model, device="cpu", dtype="float32")
    exact = HFBackend.load(args.model, device="cpu", dtype="float32", deterministic=True)
    print(f"{args.model}, torch threads {torch.get_num_threads()}, {args.rounds} rounds")
    print(f"{'batch':<26} {'default tok/s':>14} {'deterministic':>14} {'ratio':>7}")
    for batch in args.batches:
        for name, items in workloads(default.tokenizer, batch).items():
            for backend in (default, exact):  # a warm-up round of each
                tokens_per_s(backend, items)
            rounds: dict[str, list[float]] = {"default": [], "deterministic": []}
            for _ in range(args.rounds):
                rounds["default"].append(tokens_per_s(default, items))
                rounds["deterministic"].append(tokens_per_s(exact, items))
            base = statistics.median(rounds["default"])
            fixed = statistics.median(rounds["deterministic"])
            print(f"{name:<26} {base:>14.0f} {fixed:>14.0f} {fixed / base:>7.2f}")


if __name__ == "__main__":
    main()
