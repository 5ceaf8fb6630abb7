"""`make paper-table`: the GKD paper's comparison reproduced on the built-in tasks.

This module is the grid; __main__.py runs it, and report.py writes its tables, plots and
the results page.

The grid is declared here, before any result is seen (docs/RESULTS.md states the
protocol). Within a task every method gets the same student initialisation
(models/TASK/STUDENT, an SFT student), the same teacher, the same optimizer steps, prompts
per step, learning rate and schedule (configs/paper/TASK.yaml); only the method keys
differ. Three choices depend on results, each by a rule fixed in advance:

- the records task's shared learning rate: the value of LR_SWEEP with the best mean final
  validation metric over the SWEEP_METHODS at SWEEP_STUDENT (seed 0), for every method;
- the "best divergence" of a task: its on-policy divergence with the best mean final
  validation metric (all seeds) at the task's SELECTION student; it is used for
  lambda = 0.5 (mixed), and translation's for arithmetic's on-policy run;
- nothing else: every run the grid names is run and reported.

Each run writes results/paper-runs/TASK/STUDENT/LABEL/seed-N/result.json and is skipped when
that file exists, so the table can be built piecewise (`--only`) and an interrupted run
resumes. Runs are started as soon as the rules they depend on can be applied.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from student_trainer.config import TrainConfig, load_config
from student_trainer.evaluate import evaluate_model, evaluate_split

SEEDS = (0, 1, 2)
RUNS_DIR = Path("results/paper-runs")  # result.json files are committed; the rest is not
CONFIGS_DIR = Path("configs/paper")
# task -> the students (model directories under models/TASK/) the grid runs at
STUDENTS = {
    "translation": ("student",),
    "arithmetic": ("student",),
    "records": ("student-small", "student-medium", "student-large"),
}
TABLE_TASKS = tuple(STUDENTS)
# on-policy divergences by beta: 0 forward KL, 1 reverse KL, between: generalized JSD
ON_POLICY_BETAS = {"translation": (0.0, 1.0, 0.1, 0.5, 0.9), "records": (0.0, 0.5, 1.0)}
LOSS_OF_BETA = {0.0: "forward_kl", 1.0: "reverse_kl"}  # method.loss; jsd (+ beta) otherwise
# where a task's best divergence is chosen: (task, student)
SELECTION = {
    "translation": ("translation", "student"),
    "arithmetic": ("translation", "student"),
    "records": ("records", "student-medium"),
}
LR_SWEEP = {"records": (3e-4, 1e-3, 3e-3)}
# the commit that declared this grid's protocol (docs/RESULTS.md) before its first run
PROTOCOL_COMMIT = "a462faa6cfcc"
SWEEP_STUDENT = "student-medium"


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
        return LOSS_OF_BETA.get(self.beta, f"jsd({self.beta:g})")

    @property
    def label(self) -> str:
        return self.method if self.beta is None else f"{self.method}-{self.divergence}"

    def fields(self) -> dict[str, Any]:
        """What a result records of its method."""
        return {
            "label": self.label,
            "method": self.method,
            "divergence": self.divergence,
            "lambda": self.lmbda,
        }

    def overrides(self) -> list[str]:
        if self.beta is None:
            return [f"method.name={self.method}"]
        if self.beta in LOSS_OF_BETA:
            loss = [f"method.loss={LOSS_OF_BETA[self.beta]}"]
        else:
            loss = ["method.loss=jsd", f"method.loss_args.beta={self.beta}"]
        return ["method.name=gkd", *loss, f"method.lmbda={self.lmbda}"]


SWEEP_METHODS = (Method("sft"), Method("on_policy_gkd", 0.5, 1.0))  # one off-, one on-policy


def grid(task: str, best_beta: float | None) -> list[Method]:
    """The methods run for `task` (at each of its students); those needing the best
    divergence only once it is known."""
    if task == "arithmetic":
        methods = [Method("sft"), Method("supervised_kd", 0.0, 0.0)]
        if best_beta is not None:
            methods.append(Method("on_policy_gkd", best_beta, 1.0))
        return methods
    methods = [Method("sft"), Method("seqkd"), Method("supervised_kd", 0.0, 0.0)]
    methods += [Method("on_policy_gkd", beta, 1.0) for beta in ON_POLICY_BETAS[task]]
    if best_beta is not None:
        methods.append(Method("mixed_gkd", best_beta, 0.5))
    return methods


def run_dir(task: str, student: str, label: str, seed: int, runs_dir: Path = RUNS_DIR) -> Path:
    return runs_dir / task / student / label / f"seed-{seed}"


def sweep_dir(task: str, lr: float, label: str, runs_dir: Path = RUNS_DIR) -> Path:
    return runs_dir / task / "lr-sweep" / f"lr-{lr:g}" / label


def read_result(path: Path) -> dict[str, Any] | None:
    file = path / "result.json"
    return json.loads(file.read_text()) if file.is_file() else None


def _validation_curves(metrics_file: Path) -> dict[str, list[list[float]]]:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    return {
        decoding: [[r["step"], r[key]] for r in records if key in r]
        for decoding, key in (("greedy", "eval/metric"), ("sample", "eval/sampled_metric"))
    }


def run_config(
    task: str, student: str, method: Method, seed: int, out: Path, *, lr: float, extra=()
) -> TrainConfig:
    """The config of one (task, student, method, seed) run from the shared student init;
    `extra` overrides come last (tests shrink the budget with them)."""
    overrides = [
        *method.overrides(),
        f"student.model=models/{task}/{student}",
        f"run.seed={seed}",
        f"run.out_dir={out}",
        f"optim.lr={lr}",
    ]
    return load_config(CONFIGS_DIR / f"{task}.yaml", [*overrides, "run.progress=false", *extra])


def run_one(
    task: str,
    student: str,
    method: Method,
    seed: int,
    out: Path,
    *,
    lr: float,
    test: bool = True,
    extra: list[str] = (),
) -> dict[str, Any]:
    """Train one (task, student, method, seed) run (`run_config`); score it on test unless
    `test` is False (the sweep)."""
    from student_trainer.checkpoint import latest_checkpoint
    from student_trainer.train import train

    config = run_config(task, student, method, seed, out, lr=lr, extra=extra)
    shutil.rmtree(out, ignore_errors=True)  # a run killed part-way starts again from scratch
    started = time.perf_counter()
    trained = train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {
        "task": task,
        "student": student,
        **method.fields(),
        "seed": seed,
        "lr": config.optim.lr,
        "steps": trained.steps,
        "tokens": sum(r.get("tokens", 0) for r in records),
        "validation_curves": _validation_curves(out / "metrics.jsonl"),
    }
    if test:
        result["test"] = evaluate_split(config, "test", checkpoint=latest_checkpoint(out))
    result["wall_s"] = time.perf_counter() - started
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def reference(task: str, role: str, runs_dir: Path = RUNS_DIR) -> dict[str, Any]:
    """The teacher's or a student initialisation's test metrics (greedy and sampled, no
    training); for a student also its divergences to the teacher on its own samples."""
    out = runs_dir / task / f"reference-{role}"
    cached = read_result(out)
    if cached is not None:
        return cached
    config = load_config(CONFIGS_DIR / f"{task}.yaml", ["method.name=sft"])
    model_dir = Path("models") / task / role
    if role == "teacher":  # no divergence of the teacher to itself
        test = evaluate_model(model_dir, config, "test")
    else:
        test = evaluate_split(config, "test", checkpoint=model_dir)
    result = {"task": task, "role": role, "test": test}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def final_validation(result: dict[str, Any]) -> float:
    """The selection statistic: the validation metric (greedy) at the end of the run."""
    return result["validation_curves"]["greedy"][-1][1]


def chosen_lr(task: str, runs_dir: Path = RUNS_DIR) -> float | None:
    """The swept learning rate with the best mean final validation metric over the
    SWEEP_METHODS (ties: the smaller rate); None until every sweep run is done. Tasks
    without a sweep use their config's optim.lr."""
    if task not in LR_SWEEP:
        return load_config(CONFIGS_DIR / f"{task}.yaml").optim.lr
    means = {}
    for lr in LR_SWEEP[task]:
        results = [read_result(sweep_dir(task, lr, m.label, runs_dir)) for m in SWEEP_METHODS]
        if any(r is None for r in results):
            return None
        means[lr] = statistics.mean(final_validation(r) for r in results)
    return max(sorted(means), key=lambda lr: (means[lr], -lr))


def best_beta(task: str, runs_dir: Path = RUNS_DIR) -> float | None:
    """The on-policy divergence with the best mean final validation metric at the task's
    SELECTION student (all seeds must be done); ties go to the earlier declared entry."""
    where, student = SELECTION[task]
    betas = ON_POLICY_BETAS[where]
    means = {}
    for beta in betas:
        label = Method("on_policy_gkd", beta, 1.0).label
        results = [read_result(run_dir(where, student, label, s, runs_dir)) for s in SEEDS]
        if any(r is None for r in results):
            return None
        means[beta] = statistics.mean(final_validation(r) for r in results)
    return max(betas, key=lambda beta: (means[beta], -betas.index(beta)))


@dataclass(frozen=True)
class Run:
    """One training run the protocol calls for, with where it writes."""

    task: str
    student: str
    method: Method
    seed: int
    out: Path
    lr: float
    test: bool = True  # False: a sweep run, judged on validation only

    @property
    def cell(self) -> str:
        return f"{self.task}/{self.method.label}"

    def describe(self) -> str:
        where = self.student if self.test else f"lr-sweep {self.lr:g}"
        return f"{self.task}/{where}/{self.method.label} seed {self.seed}"


def planned_runs(tasks: list[str], runs_dir: Path = RUNS_DIR) -> list[Run]:
    """Every run whose rules can be applied with the results on disk, done or not; the
    runs that decide a rule (sweep, divergence selection) first."""
    runs = []
    for task in tasks:
        for lr in LR_SWEEP.get(task, ()):
            runs += [
                Run(task, SWEEP_STUDENT, m, 0, sweep_dir(task, lr, m.label, runs_dir), lr, False)
                for m in SWEEP_METHODS
            ]
        lr = chosen_lr(task, runs_dir)
        if lr is None:
            continue
        beta = best_beta(task, runs_dir)
        runs += [
            Run(
                task,
                student,
                method,
                seed,
                run_dir(task, student, method.label, seed, runs_dir),
                lr,
            )
            for student in STUDENTS[task]
            for method in grid(task, beta)
            for seed in SEEDS
        ]
    return sorted(runs, key=lambda run: not _decides_a_rule(run))


def _decides_a_rule(run: Run) -> bool:
    where, student = SELECTION[run.task]
    selecting = (run.task, run.student) == (where, student) and run.method.method == "on_policy_gkd"
    return not run.test or selecting


def init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def _execute(run: Run) -> dict[str, Any]:
    return run_one(run.task, run.student, run.method, run.seed, run.out, lr=run.lr, test=run.test)


def keep_busy(
    pool: Executor,
    plan: Callable[[], list[Any]],
    execute: Callable[[Any], dict[str, Any]],
    *,
    pending: Callable[[Any], bool],
    only: set[str],
    summary: Callable[[dict[str, Any]], str],
    desc: str,
) -> None:
    """Keep `pool` busy with every pending job `plan()` names (only `only`'s cells, when
    given); whenever one finishes, plan again, since its result may decide a rule that
    later jobs wait for. A job is hashable and has `cell` and `describe()`."""
    running: dict[Future, Any] = {}
    attempted: set[Any] = set()
    bar = tqdm(total=0, desc=desc, unit="job")
    while True:
        for job in plan():
            if job not in attempted and (not only or job.cell in only) and pending(job):
                attempted.add(job)
                running[pool.submit(execute, job)] = job
                bar.total += 1
                bar.refresh()
        if not running:
            break
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            job = running.pop(future)
            bar.update(1)
            bar.write(f"{job.describe()}: {summary(future.result())}")
    bar.close()


def _summary(result: dict[str, Any]) -> str:
    shown = result.get("test") or {"validation": final_validation(result)}
    rounded = {k: round(v, 2) for k, v in shown.items() if "metric" not in k}
    return f"{json.dumps(rounded)} in {result['wall_s']:.0f} s"


def run_grid(tasks: list[str], only: set[str], jobs: int, threads: int) -> None:
    """Keep `jobs` processes busy with every pending run; whenever one finishes, plan again,
    since its result may decide a rule that later runs wait for."""
    context = get_context("spawn")
    with ProcessPoolExecutor(jobs, context, initializer=init_worker, initargs=(threads,)) as pool:
        references = [
            pool.submit(reference, task, role)
            for task in tasks
            for role in ("teacher", *STUDENTS[task])
        ]
        keep_busy(
            pool,
            lambda: planned_runs(tasks),
            _execute,
            pending=lambda run: read_result(run.out) is None,
            only=only,
            summary=_summary,
            desc="paper table",
        )
        for future in references:
            future.result()
    for task in tasks:
        if chosen_lr(task) is None or best_beta(task) is None:
            print(f"{task}: selection runs missing (see --only): later cells not planned yet")
