"""Benchmark one on-policy GKD step: teacher behind the service vs in-process vs TRL.

Run it from the repository root (`make bench-trainer` does):

    .venv/bin/python bench/bench_trainer.py             # ~2 minutes on 2 CPU cores
    .venv/bin/python bench/bench_trainer.py --quick     # ~1 minute

One step, the same for all three: 8 prompts, the student samples up to 16 new tokens each
(temperature 1, stop at eos), the teacher scores prompt + completion, generalized
JSD(beta = 0.5) token-level mean, backward, clip 1.0, AdamW (constant lr).

- service:    our trainer, teacher = `teacher-service serve` in a separate process on
              loopback, top-64 + tail bucket over gRPC, scoring overlapped with the student;
- in-process: our trainer, the same teacher model called directly in this process;
- TRL:        trl.DistillationTrainer (TRL's in-process-teacher on-policy GKD) on the same
              models and prompts (bench/trl_reference.py); skipped when TRL is not installed.

The target (docs/design.md): a step no slower than TRL's in-process-teacher trainer. By default
the service's teacher competes with the trainer for the same cores, an upper bound on the
service's cost; `--separate-cores` gives every trainer CPU 0 (1 thread) and the service
CPU 1, a teacher on its own device as deployed (TRL and the in-process teacher then run
the teacher on the trainer's core, as they do on a GPU). The configurations alternate over
several rounds and the table reports medians per step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import ROOT, ServerProcess
from trl_reference import trl_step_seconds

from student_trainer.config import load_config
from student_trainer.data import encode_prompt
from student_trainer.tasks import TASKS
from student_trainer.teacher import LocalTeacher
from student_trainer.tiny_model import TinyModelSpec, build_tiny_model
from student_trainer.train import Trainer
from teacher_service.cli import free_port, serve_command

WARMUP_STEPS = 2


def build_models(args: argparse.Namespace) -> tuple[Path, Path]:
    """Teacher and student for the benchmark, cached under .cache/ (same tokenizer)."""

    def spec(hidden: int, layers: int, seed: int) -> TinyModelSpec:
        return TinyModelSpec(
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3,
            num_layers=layers,
            num_heads=max(2, hidden // 64),
            num_kv_heads=2,
            seed=seed,
        )

    teacher = ROOT / ".cache" / f"bench-teacher-h{args.teacher_hidden}-l{args.teacher_layers}"
    student = ROOT / ".cache" / f"bench-student-h{args.student_hidden}-l{args.student_layers}"
    if not (teacher / "config.json").is_file():
        build_tiny_model(teacher, spec(args.teacher_hidden, args.teacher_layers, 0))
    if not (student / "config.json").is_file():
        build_tiny_model(
            student, spec(args.student_hidden, args.student_layers, 1), tokenizer_from=teacher
        )
    return teacher, student


def our_steps(args, student: Path, address: str, teacher=None) -> tuple[list[float], float]:
    """Seconds per step of our trainer (after warmup) and the mean hidden teacher fraction."""
    config = load_config(
        None,
        [
            f"student.model={student}",
            f"teacher.address={address}",
            f"run.out_dir={ROOT / 'runs' / 'bench-trainer'}",
            "run.progress=false",
            f"optim.batch_size={args.batch_size // args.grad_accum}",
            f"optim.grad_accum={args.grad_accum}",
            "optim.schedule=constant",
            "optim.lr=1e-3",
            "optim.warmup_steps=0",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            "method.beta=0.5",
            f"method.top_k={args.top_k}",
        ],
    )
    trainer = Trainer(config, teacher=teacher)
    try:
        records = [trainer.train_step() for _ in range(WARMUP_STEPS + args.steps)]
    finally:
        trainer.close()
    timed = records[WARMUP_STEPS:]
    return [r["step_s"] for r in timed], statistics.mean(r["hidden_fraction"] for r in timed)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1, help="ours only (TRL: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument(
        "--separate-cores",
        action="store_true",
        help="trainers (ours and TRL) on CPU 0 with 1 thread, the service's teacher on CPU 1 "
        "with 1 thread: a teacher on its own device, as deployed",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 5
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    server_prefix: list[str] = []
    if args.separate_cores:
        os.sched_setaffinity(0, {0})
        torch.set_num_threads(1)
        server_prefix = ["taskset", "-c", "1"]
    teacher_dir, student_dir = build_models(args)
    task = TASKS["addition"].splits(64, 0, 0, seed=0).train
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    prompts = [encode_prompt(tokenizer, e.prompt) for e in task]

    port = free_port()
    server = ServerProcess(
        serve_command(teacher_dir, port),
        f"127.0.0.1:{port}",
        ROOT / "runs" / "bench-trainer-server.log",
    )
    server.log_path.parent.mkdir(parents=True, exist_ok=True)
    server.command = server_prefix + server.command
    threads = {"OMP_NUM_THREADS": "1"} if args.separate_cores else {}
    server.start({**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", **threads})
    in_process = LocalTeacher.load(teacher_dir)
    times: dict[str, list[float]] = {"service": [], "in-process": [], "TRL": []}
    hidden: dict[str, list[float]] = {"service": [], "in-process": []}
    try:
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", flush=True)
            steps, frac = our_steps(args, student_dir, server.address)
            times["service"] += steps
            hidden["service"].append(frac)
            steps, frac = our_steps(args, student_dir, "unused:1", teacher=in_process)
            times["in-process"] += steps
            hidden["in-process"].append(frac)
            if not args.no_trl:
                trl = trl_step_seconds(
                    str(teacher_dir),
                    str(student_dir),
                    prompts,
                    max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size,
                    steps=WARMUP_STEPS + args.steps,
                    beta=0.5,
                    lr=1e-3,
                    seed=round_index,
                )
                if trl is not None:
                    times["TRL"].append(trl)
    finally:
        server.stop()

    median = {k: statistics.median(v) for k, v in times.items() if v}
    print(
        f"\none on-policy GKD step: {args.batch_size} prompts x <= {args.max_new_tokens} new "
        f"tokens, teacher h{args.teacher_hidden}/l{args.teacher_layers}, student "
        f"h{args.student_hidden}/l{args.student_layers}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"{'configuration':14s} {'median ms/step':>15s} {'teacher hidden':>15s}")
    for name, value in median.items():
        share = f"{statistics.mean(hidden[name]):.0%}" if name in hidden else "-"
        print(f"{name:14s} {value * 1000:15.1f} {share:>15s}")
    ratios = {"service / in-process": median["service"] / median["in-process"]}
    if "TRL" in median:
        ratios["service / TRL"] = median["service"] / median["TRL"]
        ratios["in-process / TRL"] = median["in-process"] / median["TRL"]
    for name, value in ratios.items():
        print(f"{name:24s} {value:.2f}x  (lower is faster)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "median_s": median,
                    "ratios": ratios,
                    "hidden": {k: statistics.mean(v) for k, v in hidden.items()},
                    "args": vars(args) | {"json": str(args.json)},
                    "time": time.time(),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
