"""`make demo`: the mission end to end on the built-in default (configs/demo.yaml).

The records task's teacher (a 2.0M-parameter Llama trained by SFT) and its medium student
(111k parameters, the same tokenizer, also SFT) are committed under models/records
(`make models` rebuilds them). The demo starts `teacher-service serve` with the teacher on
loopback, scores the teacher on held-out prompts, distils the student on-policy against the
service, then trains the same student by SFT for the same steps, batch and learning rate
(the baseline a user would otherwise run), and prints teacher / before / on-policy / SFT.
This is the cell of the paper table (docs/RESULTS.md) where on-policy distillation pays
most. The service stops with SIGTERM. Metrics land in runs/demo/{on-policy,sft}/metrics.jsonl.

The teacher and the trainer share one machine: each gets half of the CPUs this process may
use (causal_lm/threads.py; at least one thread each), not all of them, so neither's
threads wait on CPUs the other holds (docs/benchmarks.md, "Threads"). --threads N gives
each N instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from transformers.utils import logging as transformers_logging

from causal_lm.threads import configure_threads
from student_trainer.config import TrainConfig, load_config, objective_from
from student_trainer.evaluate import evaluate_model
from student_trainer.train import TrainResult, train
from teacher_client import TeacherClient

METRIC_LABELS = {
    "exact_match": "exact match (%)",
    "chrf": "chrF",
    "accuracy": "accuracy (%)",
    "faithful": "faithful (%)",
}
DIVERGENCE_LABELS = {
    "eval/forward_kl": "forward KL(teacher || student)",
    "eval/reverse_kl": "reverse KL(student || teacher)",
}


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _free_port() -> int:
    """A loopback port nobody listens on right now, for the service."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_command(teacher_dir: Path, port: int, threads: int) -> list[str]:
    """`teacher-service serve` with this Python, quiet, on CPU (the service is a separate
    program: the demo starts it as a user would, and imports none of it), deterministic:
    the teacher's answers do not depend on how its forwards fall, so every run of the demo
    prints the same table."""
    return [sys.executable, "-m", "teacher_service", "--log-level", "WARNING", "serve",
            "--model", str(teacher_dir), "--port", str(port), "--device", "cpu",
            "--threads", str(threads), "--deterministic"]  # fmt: skip


def _teacher_scores(config: TrainConfig, teacher_dir: Path) -> dict[str, float]:
    """The teacher's own answers on the prompts the student is evaluated on."""
    return evaluate_model(teacher_dir, config, "validation", size=config.run.eval_size)


def _require_models(*dirs: Path) -> None:
    for path in dirs:
        if not (path / "config.json").is_file():
            raise SystemExit(f"{path} is missing: run `make models` to build it (SFT)")


def _sft_baseline(config: TrainConfig) -> TrainConfig:
    """The same run but for what the student learns from: the dataset's references."""
    baseline = copy.deepcopy(config)
    baseline.method.name = "sft"
    baseline.run.out_dir = str(Path(config.run.out_dir).parent / "sft")
    return baseline


def _print_table(
    config: TrainConfig, teacher: dict[str, float], on_policy: TrainResult, sft: TrainResult
) -> None:
    before = on_policy.evaluations[0]
    after = {"on-policy": on_policy.evaluations[-1], "SFT": sft.evaluations[-1]}
    print(
        f"\n    {config.task.name}, {config.run.eval_size} held-out (validation) prompts; "
        f"greedy decoding, and one sample per prompt at temperature "
        f"{config.rollout.temperature:g}:"
    )
    print(f"    {'':34s} {'teacher':>9s} {'before':>9s} {'on-policy':>9s} {'SFT':>9s}")
    for name in (k for k in teacher if k not in ("metric", "sampled_metric")):
        key = f"eval/{name}"
        label = METRIC_LABELS.get(name.removeprefix("sampled_"), name)
        label = f"{label}, sampled" if name.startswith("sampled_") else label
        cells = " ".join(f"{run[key]:9.2f}" for run in (before, *after.values()))
        print(f"    {label:34s} {teacher[name]:9.2f} {cells}")
    for key, label in DIVERGENCE_LABELS.items():
        cells = " ".join(f"{run[key]:9.4f}" for run in (before, *after.values()))
        print(f"    {label:34s} {'':>9s} {cells}")


def run(config_path: Path, teacher_dir: Path, steps: int | None, threads: int = 0) -> None:
    transformers_logging.disable_progress_bar()
    started = time.perf_counter()
    config = load_config(config_path)
    _require_models(teacher_dir, Path(config.student.model))
    share = configure_threads(threads, processes=2)  # this process: the trainer's share
    _step(f"threads: {share.count} for the teacher, {share.count} for the trainer ({share.reason})")
    port = _free_port()
    _step(f"starting teacher-service on 127.0.0.1:{port} (model {teacher_dir})")
    server = subprocess.Popen(
        _serve_command(teacher_dir, port, share.count),
        env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )
    try:
        with TeacherClient(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_until_serving(timeout=120)
        overrides = [f"teacher.address=127.0.0.1:{port}"]
        if steps is not None:
            overrides.append(f"optim.steps={steps}")
        config = load_config(config_path, overrides)
        baseline = _sft_baseline(config)
        for run_config in (config, baseline):  # the demo always starts fresh
            shutil.rmtree(run_config.run.out_dir, ignore_errors=True)
        _step(f"scoring the teacher on {config.run.eval_size} held-out prompts")
        teacher = _teacher_scores(config, teacher_dir)
        m, o, loss = config.method, config.optim, objective_from(config.method)
        _step(
            f"on-policy GKD of {config.student.model} through the service: lambda={m.lmbda}, "
            f"loss {loss.name} over the {loss.support} vocabulary, {o.steps} steps x "
            f"{o.batch_size} prompts, lr {o.lr:g}"
        )
        on_policy = train(config)
        _step("baseline: SFT of the same student on the references, same steps, batch and lr")
        sft = train(baseline)
    finally:
        _step("stopping the service (SIGTERM)")
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    _print_table(config, teacher, on_policy, sft)
    records = [json.loads(line) for line in (on_policy.out_dir / "metrics.jsonl").open()]
    steps_run = [r for r in records if "loss" in r]
    hidden = sum(r["hidden_fraction"] for r in steps_run) / len(steps_run)
    print(
        "\n    divergences: per token, on the student's own samples, scored by the teacher.\n"
        f"    on-policy: teacher latency hidden behind student work: {hidden:.0%} (mean).\n"
        "    Sampling at temperature 1 is the paper's setting, where SFT samples worst. Every\n"
        "    method at its own best temperature, 3 seeds, 1,000 test prompts: `make\n"
        "    fair-table`; the paper's setting in full: `make paper-table` (docs/RESULTS.md)."
    )
    if code != 0:
        raise SystemExit(f"teacher-service exited with {code}")
    _step(
        f"done in {time.perf_counter() - started:.0f} s; metrics and checkpoints in "
        f"{on_policy.out_dir} and {sft.out_dir}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--teacher", type=Path, default=Path("models/records/teacher"))
    parser.add_argument("--steps", type=int, help="override optim.steps")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of the teacher and of the trainer, each (0: half the CPUs each)",
    )
    args = parser.parse_args()
    run(args.config, args.teacher, args.steps, args.threads)


if __name__ == "__main__":
    main()
