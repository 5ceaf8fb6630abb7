"""`make demo`: the mission end to end on the built-in default (configs/demo.yaml).

The translation task's teacher (a 1.9M-parameter Llama trained by SFT) and its student
(37k parameters, the same BPE tokenizer, also SFT) are committed under models/translation
(`make models` rebuilds them). The demo starts `teacher-service serve` with the teacher on
loopback, scores the teacher on held-out prompts, runs on-policy GKD of the student
against the service, prints teacher / student before / student after, and stops the
service with SIGTERM. Metrics land in runs/demo/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from transformers.utils import logging as transformers_logging

from student_trainer.config import TrainConfig, load_config
from student_trainer.train import evaluate_split, train
from teacher_service.cli import free_port, serve_command
from teacher_service.client import TeacherClient

METRIC_LABELS = {
    "exact_match": "exact match (%)",
    "chrf": "chrF",
    "accuracy": "accuracy (%)",
    "faithful": "faithful (%)",
}


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _teacher_scores(config: TrainConfig, teacher_dir: Path) -> dict[str, float]:
    """The teacher's own greedy answers on the prompts the student is evaluated on."""
    as_student = copy.deepcopy(config)
    as_student.student.model = str(teacher_dir)
    as_student.method.name = "sft"
    as_student.teacher.address = ""
    return evaluate_split(as_student, "validation", size=config.run.eval_size)


def _require_models(*dirs: Path) -> None:
    for path in dirs:
        if not (path / "config.json").is_file():
            raise SystemExit(f"{path} is missing: run `make models` to build it (SFT)")


def run(config_path: Path, teacher_dir: Path, steps: int | None) -> None:
    transformers_logging.disable_progress_bar()
    started = time.perf_counter()
    config = load_config(config_path)
    _require_models(teacher_dir, Path(config.student.model))
    port = free_port()
    _step(f"starting teacher-service on 127.0.0.1:{port} (model {teacher_dir})")
    server = subprocess.Popen(
        serve_command(teacher_dir, port),
        env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )
    try:
        with TeacherClient(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_until_serving(timeout=120)
        overrides = [f"teacher.address=127.0.0.1:{port}"]
        if steps is not None:
            overrides.append(f"optim.steps={steps}")
        config = load_config(config_path, overrides)
        shutil.rmtree(config.run.out_dir, ignore_errors=True)  # the demo always starts fresh
        _step(f"scoring the teacher on {config.run.eval_size} held-out prompts")
        teacher = _teacher_scores(config, teacher_dir)
        m = config.method
        _step(
            f"on-policy GKD of {config.student.model}: lambda={m.lmbda}, beta={m.beta} "
            f"(generalized JSD) on the teacher's top-{m.top_k} + tail, {config.optim.steps} "
            f"steps x {config.optim.grad_accum} micro-batch x {config.optim.batch_size} prompts"
        )
        result = train(config)
        records = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").open()]
    finally:
        _step("stopping the service (SIGTERM)")
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    before, after = result.evaluations[0], result.evaluations[-1]
    print(
        f"\n    {config.task.name}, {config.run.eval_size} held-out (validation) prompts, "
        f"greedy decoding and samples at temperature {config.rollout.temperature:g}:"
    )
    print(f"    {'':34s} {'teacher':>8s} {'before':>8s} {'after':>8s}")
    metric_names = [k for k in teacher if k not in ("metric", "sampled_metric")]
    for name in metric_names:
        key = f"eval/{name}"
        label = METRIC_LABELS.get(name.removeprefix("sampled_"), name)
        label = f"{label}, sampled" if name.startswith("sampled_") else label
        print(f"    {label:34s} {teacher[name]:8.2f} {before[key]:8.2f} {after[key]:8.2f}")
    for key, label in (
        ("eval/forward_kl", "forward KL(teacher || student)"),
        ("eval/reverse_kl", "reverse KL(student || teacher)"),
        ("eval/divergence", f"generalized JSD(beta={m.beta})"),
    ):
        print(f"    {label:34s} {'':>8s} {before[key]:8.4f} {after[key]:8.4f}")
    steps_run = [r for r in records if "loss" in r]
    hidden = sum(r["hidden_fraction"] for r in steps_run) / len(steps_run)
    print(
        "\n    divergences: per token, on the student's own samples, scored by the teacher "
        f"(top-{m.top_k} + tail bucket).\n"
        f"    teacher latency hidden behind student work: {hidden:.0%} (mean over steps)"
    )
    if code != 0:
        raise SystemExit(f"teacher-service exited with {code}")
    _step(
        f"done in {time.perf_counter() - started:.0f} s; metrics in "
        f"{result.out_dir / 'metrics.jsonl'}, checkpoints in {result.out_dir / 'checkpoints'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--teacher", type=Path, default=Path("models/translation/teacher"))
    parser.add_argument("--steps", type=int, help="override optim.steps")
    args = parser.parse_args()
    run(args.config, args.teacher, args.steps)


if __name__ == "__main__":
    main()
