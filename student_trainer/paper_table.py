"""`make paper-table`: the GKD paper's comparison reproduced on the built-in tasks.

The grid is declared here, before any result is seen, and every method gets the same
student initialisation (models/TASK/student, an SFT student), the same teacher, the same
optimizer steps, prompts per step, learning rate and schedule (configs/paper/TASK.yaml).
Only the method keys differ. Two choices depend on results, by a rule fixed in advance:
the "best divergence" is the on-policy GKD divergence with the highest mean validation
metric on translation; it is used for lambda = 0.5 and for the arithmetic task.

Each run writes results/paper-runs/TASK/LABEL/seed-N/result.json and is skipped when that file
exists, so the table can be built piecewise (`--only`) and an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from student_trainer.config import load_config

SEEDS = (0, 1, 2)
RUNS_DIR = Path("results/paper-runs")  # result.json files are committed; the rest is not
CONFIGS_DIR = Path("configs/paper")
ON_POLICY_BETAS = (0.0, 1.0, 0.1, 0.5, 0.9)  # forward KL, reverse KL, JSD(0.1 / 0.5 / 0.9)


@dataclass(frozen=True)
class Method:
    """One row of the grid: a method name from the issue's vocabulary and its config keys."""

    method: str  # sft | seqkd | supervised_kd | on_policy_gkd | mixed_gkd
    beta: float | None = None
    lmbda: float | None = None

    @property
    def divergence(self) -> str | None:
        if self.beta is None:
            return None
        return {0.0: "forward_kl", 1.0: "reverse_kl"}.get(self.beta, f"jsd({self.beta:g})")

    @property
    def label(self) -> str:
        return self.method if self.beta is None else f"{self.method}-{self.divergence}"

    def overrides(self) -> list[str]:
        if self.beta is None:
            return [f"method.name={self.method}"]
        return ["method.name=gkd", f"method.beta={self.beta}", f"method.lmbda={self.lmbda}"]


def grid(task: str, best_beta: float | None) -> list[Method]:
    """The methods run for `task`; those needing the best divergence only once it is known."""
    if task == "translation":
        methods = [Method("sft"), Method("seqkd"), Method("supervised_kd", 0.0, 0.0)]
        methods += [Method("on_policy_gkd", beta, 1.0) for beta in ON_POLICY_BETAS]
        if best_beta is not None:
            methods.append(Method("mixed_gkd", best_beta, 0.5))
        return methods
    methods = [Method("sft"), Method("supervised_kd", 0.0, 0.0)]
    if best_beta is not None:
        methods.append(Method("on_policy_gkd", best_beta, 1.0))
    return methods


TABLE_TASKS = ("translation", "arithmetic")


def run_dir(task: str, label: str, seed: int, runs_dir: Path = RUNS_DIR) -> Path:
    return runs_dir / task / label / f"seed-{seed}"


def read_result(path: Path) -> dict[str, Any] | None:
    file = path / "result.json"
    return json.loads(file.read_text()) if file.is_file() else None


def _validation_curve(metrics_file: Path) -> list[list[float]]:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    return [[r["step"], r["eval/metric"]] for r in records if "eval/metric" in r]


def run_one(
    task: str, method: Method, seed: int, runs_dir: Path = RUNS_DIR, extra: list[str] = ()
) -> dict[str, Any]:
    """Train one (task, method, seed) from the shared student init; score it on test.
    `extra` overrides come last (tests shrink the budget with them)."""
    from student_trainer.checkpoint import latest_checkpoint
    from student_trainer.train import evaluate_split, train

    out = run_dir(task, method.label, seed, runs_dir)
    overrides = [*method.overrides(), f"run.seed={seed}", f"run.out_dir={out}"]
    config = load_config(CONFIGS_DIR / f"{task}.yaml", [*overrides, "run.progress=false", *extra])
    shutil.rmtree(out, ignore_errors=True)  # a run killed part-way starts again from scratch
    started = time.perf_counter()
    trained = train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {
        "task": task,
        "label": method.label,
        "method": method.method,
        "divergence": method.divergence,
        "lambda": method.lmbda,
        "seed": seed,
        "steps": trained.steps,
        "tokens": sum(r.get("tokens", 0) for r in records),
        "validation_curve": _validation_curve(out / "metrics.jsonl"),
        "test": evaluate_split(config, "test", checkpoint=latest_checkpoint(out)),
    }
    result["wall_s"] = time.perf_counter() - started
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def reference(task: str, role: str, runs_dir: Path = RUNS_DIR) -> dict[str, Any]:
    """The teacher's or the student initialisation's test metrics (greedy, no training);
    for the student also its divergences to the teacher on its own samples."""
    out = runs_dir / task / f"reference-{role}"
    cached = read_result(out)
    if cached is not None:
        return cached
    overrides = [f"student.model=models/{task}/{role}", "method.name=sft"]
    if role == "teacher":
        overrides.append("teacher.in_process=")  # no divergence of the teacher to itself
    config = load_config(CONFIGS_DIR / f"{task}.yaml", overrides)
    from student_trainer.train import evaluate_split

    result = {"task": task, "role": role, "test": evaluate_split(config, "test")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def best_beta(runs_dir: Path = RUNS_DIR) -> float | None:
    """The on-policy divergence with the best mean final validation metric on translation
    (all seeds must be done); ties go to the earlier entry of ON_POLICY_BETAS."""
    means = {}
    for beta in ON_POLICY_BETAS:
        label = Method("on_policy_gkd", beta, 1.0).label
        results = [read_result(run_dir("translation", label, s, runs_dir)) for s in SEEDS]
        if any(r is None for r in results):
            return None
        means[beta] = statistics.mean(r["validation_curve"][-1][1] for r in results)
    return max(ON_POLICY_BETAS, key=lambda beta: (means[beta], -ON_POLICY_BETAS.index(beta)))


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def _pending(tasks: list[str], only: set[str], beta: float | None) -> list[tuple[str, Method, int]]:
    return [
        (task, method, seed)
        for task in tasks
        for method in grid(task, beta)
        for seed in SEEDS
        if (not only or f"{task}/{method.label}" in only)
        and read_result(run_dir(task, method.label, seed)) is None
    ]


def run_grid(tasks: list[str], only: set[str], jobs: int, threads: int) -> None:
    """Phase 1 (everything not needing the best divergence), then phase 2 with it."""
    context = get_context("spawn")
    with ProcessPoolExecutor(jobs, context, initializer=_init_worker, initargs=(threads,)) as pool:
        for task in tasks:
            for role in ("teacher", "student"):
                reference(task, role)
        for phase in (1, 2):
            beta = best_beta()
            if phase == 2 and beta is None:
                print("best divergence unknown (translation on-policy runs missing): stopping")
                return
            work = _pending(tasks, only, beta)
            if phase == 2:
                print(f"best on-policy divergence on translation (validation): beta={beta:g}")
            futures = [pool.submit(run_one, *item) for item in work]
            bar = tqdm(total=len(futures), desc=f"paper table, phase {phase}", unit="run")
            for future in futures:
                result = future.result()
                bar.update(1)
                bar.write(
                    f"{result['task']}/{result['label']} seed {result['seed']}: "
                    f"test {json.dumps({k: round(v, 3) for k, v in result['test'].items()})} "
                    f"in {result['wall_s']:.0f} s"
                )
            bar.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="paper-table", description=__doc__)
    parser.add_argument("--task", action="append", choices=TABLE_TASKS, help="default: both")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TASK/LABEL",
        help="run only these cells, e.g. translation/sft (repeatable); the report uses all",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report only")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    _init_worker(threads)  # the parent scores the references
    if not args.report_only:
        run_grid(args.task or list(TABLE_TASKS), set(args.only), args.jobs, threads)
    from student_trainer.report import write_report

    elapsed = None if args.report_only else time.perf_counter() - started
    write_report(" ".join(["make paper-table", *sys.argv[1:]]), elapsed)


if __name__ == "__main__":
    main()
