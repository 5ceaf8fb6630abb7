"""What `serve --deterministic` costs a trainer: step time of on-policy distillation through
a served records teacher in the default mode and in the batch-invariant mode, side by side
in one run (bench/bench_deterministic.py measures the teacher's scoring alone).

    .venv/bin/python bench/bench_deterministic_steps.py      # 3 rounds x 10 steps per mode
    .venv/bin/python bench/bench_deterministic_steps.py --rounds 1 --steps 1 --warmup 0  # smoke

Two `teacher-service serve` processes of models/records/teacher, one of them with
`--deterministic`, start together; a trainer as configs/paper/records.yaml sets it up
(student models/records/student-medium, on-policy reverse KL over the full vocabulary, up
to 96 new tokens, batch 32) trains against each in turn, from the same seed. Each round
runs, for each mode, `--warmup` untimed steps and `--steps` timed ones (a fresh trainer:
its first steps sample what the other mode's first steps sampled); the modes alternate
round by round, so a machine's drift hits both. It prints the median step time (the
trainer's `step_s`), the median time the teacher took to answer a step (`teacher_latency_s`)
and the ratios deterministic / default. By default the trainer and each server get one
torch thread, as `make demo` gives them on 2 cores (the idle server waits on its socket).
Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "teacher-client"), str(ROOT / "bench")]

from bench_service import ServerProcess  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from student_trainer.config import load_config  # noqa: E402
from student_trainer.train import Trainer  # noqa: E402
from teacher_service.cli import free_port, serve_command  # noqa: E402

MODES = ("default", "deterministic")


def start_servers(args: argparse.Namespace, logs: Path) -> dict[str, ServerProcess]:
    servers = {}
    for mode in MODES:
        port = free_port()
        flags = ["--threads", str(args.server_threads)]
        flags += ["--deterministic"] if mode == "deterministic" else []
        command = serve_command(args.teacher, port, *flags)
        servers[mode] = ServerProcess(command, f"127.0.0.1:{port}", logs / f"{mode}.log")
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for server in servers.values():
        server.launch(env)
    for server in servers.values():
        server.wait_serving()
    return servers


def steps(args: argparse.Namespace, address: str, out_dir: Path) -> list[dict]:
    """The timed steps' records of a fresh trainer against the teacher at `address`."""
    config = load_config(
        ROOT / "configs" / "paper" / "records.yaml",
        [
            f"student.model={args.student}",
            "teacher.in_process=",
            f"teacher.address={address}",
            "method.loss=reverse_kl",
            f"optim.batch_size={args.batch_size}",
            "optim.steps=1000",  # the schedule of a long run: the timed steps are its first
            f"rollout.max_new_tokens={args.max_new_tokens}",
            f"task.train_size={max(2000, args.batch_size * (args.warmup + args.steps))}",
            "run.eval_every=0",
            "run.eval_size=0",
            "run.progress=false",
            f"run.out_dir={out_dir}",
        ],
    )
    trainer = Trainer(config)
    try:
        records = [trainer.train_step() for _ in range(args.warmup + args.steps)]
    finally:
        trainer.close()
    return records[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default=str(ROOT / "models/records/teacher"))
    parser.add_argument("--student", default=str(ROOT / "models/records/student-medium"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1, help="the trainer's torch threads")
    parser.add_argument("--server-threads", type=int, default=1, help="each server's threads")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    records: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        servers = start_servers(args, Path(tmp))
        try:
            for round_index in range(args.rounds):
                order = MODES if round_index % 2 == 0 else MODES[::-1]
                for mode in order:
                    out_dir = Path(tmp) / f"run-{mode}-{round_index}"
                    records[mode] += steps(args, servers[mode].address, out_dir)
                print(f"round {round_index + 1}/{args.rounds} done", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    print(
        f"{Path(args.teacher).name} served, student {Path(args.student).name}, on-policy "
        f"reverse KL (full support), batch {args.batch_size}, <= {args.max_new_tokens} new "
        f"tokens; threads: trainer {args.threads}, each server {args.server_threads}; "
        f"{args.rounds} rounds x {args.steps} timed steps per mode"
    )
    print(f"{'mode':<14} {'step s (median)':>16} {'teacher s (median)':>19}")
    medians = {}
    for mode in MODES:
        step = statistics.median(r["step_s"] for r in records[mode])
        teacher = statistics.median(r["teacher_latency_s"] for r in records[mode])
        medians[mode] = (step, teacher)
        print(f"{mode:<14} {step:>16.3f} {teacher:>19.3f}")
    (step0, teacher0), (step1, teacher1) = medians["default"], medians["deterministic"]
    print(f"{'ratio':<14} {step1 / step0:>16.2f} {teacher1 / teacher0:>19.2f}")


if __name__ == "__main__":
    main()
