"""The paper table's report: results/paper_table.json, docs/RESULTS.md's table section and
the learning-curve PNG, all computed from the runs' result.json files.

docs/RESULTS.md keeps everything outside its generated section (the analysis), so a
rerun refreshes the numbers without touching the prose.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from student_trainer.paper_table import (
    RUNS_DIR,
    SEEDS,
    TABLE_TASKS,
    best_beta,
    grid,
    read_result,
    run_dir,
)
from student_trainer.tasks import TASKS

RESULTS_JSON = Path("results/paper_table.json")
RESULTS_MD = Path("docs/RESULTS.md")
CURVES_PNG = Path("docs/paper_curves.png")
BEGIN, END = "<!-- paper-table:begin -->", "<!-- paper-table:end -->"
DIVERGENCES = ("forward_kl", "reverse_kl")  # per token, on the student's samples (test)
METRIC_LABELS = {"exact_match": "exact match", "chrf": "chrF", "accuracy": "accuracy"}


def gap_closed(mean: float, student_init: float, teacher: float) -> float:
    """Percent of the teacher - student-init gap this mean closes (negative: it widened)."""
    return 100.0 * (mean - student_init) / (teacher - student_init)


def table_rows(runs_dir: Path = RUNS_DIR) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The JSON rows, and per-run facts (steps, tokens, wall time) for the markdown."""
    rows: list[dict[str, Any]] = []
    facts: dict[str, Any] = {"wall_s": 0.0, "runs": 0, "cells": {}}
    beta = best_beta(runs_dir)
    for task in TABLE_TASKS:
        refs = {
            role: read_result(runs_dir / task / f"reference-{role}")
            for role in ("teacher", "student")
        }
        if any(r is None for r in refs.values()):
            continue
        metrics = list(TASKS[task].metrics)
        facts.setdefault("init", {})[task] = refs["student"]["test"]
        for role, name in (("teacher", "teacher"), ("student", "student_init")):
            rows += [
                {"task": task, "method": name, "metric": m, "mean": refs[role]["test"][m]}
                for m in metrics
            ]
        for method in grid(task, beta):
            results = [read_result(run_dir(task, method.label, s, runs_dir)) for s in SEEDS]
            if any(r is None for r in results):
                continue
            facts["wall_s"] += sum(r["wall_s"] for r in results)
            facts["runs"] += len(results)
            facts["cells"][(task, method.label)] = {
                "steps": results[0]["steps"],
                **{k: statistics.mean(r["test"][k] for r in results) for k in DIVERGENCES},
                "tokens": statistics.mean(r["tokens"] for r in results),
                "curves": [r["validation_curve"] for r in results],
            }
            for m in metrics:
                values = [r["test"][m] for r in results]
                mean = statistics.mean(values)
                rows.append(
                    {
                        "task": task,
                        "method": method.method,
                        "divergence": method.divergence,
                        "lambda": method.lmbda,
                        "seeds": list(SEEDS),
                        "metric": m,
                        "mean": mean,
                        "std": statistics.stdev(values),
                        "gap_closed": gap_closed(
                            mean, refs["student"]["test"][m], refs["teacher"]["test"][m]
                        ),
                        "label": method.label,
                    }
                )
    return rows, facts


def _cell(row: dict[str, Any]) -> str:
    return f"{row['mean']:.2f} ± {row['std']:.2f}"


def markdown_table(task: str, rows: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    metrics = list(TASKS[task].metrics)
    head = ["method", "divergence", "λ"]
    for m in metrics:
        head += [f"{METRIC_LABELS[m]} (mean ± std)", "gap closed"]
    head += ["fwd KL", "rev KL", "steps", "tokens / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    refs = {
        (r["method"], r["metric"]): r["mean"] for r in rows if r["task"] == task and "std" not in r
    }
    for name in ("teacher", "student_init"):
        cells = [name, "", ""]
        for m in metrics:
            cells += [f"{refs[(name, m)]:.2f}", ""]
        init = facts["init"][task] if name == "student_init" else {}
        cells += [f"{init[k]:.3f}" if k in init else "" for k in DIVERGENCES]
        lines.append("| " + " | ".join([*cells, "", ""]) + " |")
    labels = dict.fromkeys(r["label"] for r in rows if r["task"] == task and "label" in r)
    for label in labels:
        by_metric = {r["metric"]: r for r in rows if r["task"] == task and r.get("label") == label}
        first = by_metric[metrics[0]]
        lam = "" if first["lambda"] is None else f"{first['lambda']:g}"
        cells = [first["method"], first["divergence"] or "", lam]
        for m in metrics:
            cells += [_cell(by_metric[m]), f"{by_metric[m]['gap_closed']:.0f}%"]
        cell = facts["cells"][(task, label)]
        cells += [f"{cell[k]:.3f}" for k in DIVERGENCES]
        cells += [str(cell["steps"]), f"{cell['tokens']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(facts: dict[str, Any], path: Path = CURVES_PNG) -> None:
    """Validation metric vs optimizer step, mean over seeds, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TABLE_TASKS), figsize=(6 * len(TABLE_TASKS), 4.2))
    for axis, task in zip(axes, TABLE_TASKS):
        for (cell_task, label), cell in facts["cells"].items():
            if cell_task != task:
                continue
            steps = [point[0] for point in cell["curves"][0]]
            means = [statistics.mean(c[i][1] for c in cell["curves"]) for i in range(len(steps))]
            axis.plot(steps, means, marker="o", markersize=3, label=label)
        axis.set_title(f"{task}: validation {METRIC_LABELS[TASKS[task].metric_name]}")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(f"{METRIC_LABELS[TASKS[task].metric_name]} (%), mean of 3 seeds")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, no GPU"


def generated_section(
    command: str, elapsed_s: float | None, rows: list[dict[str, Any]], facts: dict[str, Any]
) -> str:
    """`elapsed_s` None: the report was rebuilt from the per-run results, nothing was run."""
    beta = best_beta()
    run_time = f"the {facts['runs']} runs took {facts['wall_s'] / 60:.1f} min of run time in all"
    if elapsed_s is None:
        origin = f"Rebuilt by `{command}` from the per-run results ({run_time})."
    else:
        origin = (
            f"Command: `{command}` (elapsed {elapsed_s / 60:.1f} min in the invocation that "
            f"wrote this; {run_time})."
        )
    parts = [
        BEGIN,
        "<!-- generated by `make paper-table` (student_trainer/report.py): edit outside -->",
        f"{origin} Seeds: {', '.join(map(str, SEEDS))}. Hardware: {_hardware()}.",
        "",
        "Configs: `configs/paper/translation.yaml`, `configs/paper/arithmetic.yaml` (every "
        "method: same student initialisation, steps, prompts per step, learning rate). "
        "Metrics on the test split, greedy decoding; gap closed = (method - student init) / "
        "(teacher - student init). fwd KL / rev KL: per-token KL(teacher || student) and "
        "KL(student || teacher) on the student's own samples (temperature 1) of the test "
        "prompts, mean over seeds.",
    ]
    if beta is not None:
        parts.append(
            f"Best on-policy divergence on translation (validation metric): beta = {beta:g}."
        )
    for task in TABLE_TASKS:
        if any(r["task"] == task for r in rows):
            parts += ["", f"### {task}", "", markdown_table(task, rows, facts)]
    parts += ["", f"![validation metric vs optimizer step]({CURVES_PNG.name})", END]
    return "\n".join(parts)


def write_report(command: str, elapsed_s: float | None) -> None:
    rows, facts = table_rows()
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    public = [{k: v for k, v in row.items() if k != "label"} for row in rows]
    RESULTS_JSON.write_text(json.dumps(public, indent=2) + "\n")
    plot_curves(facts)
    section = generated_section(command, elapsed_s, rows, facts)
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    RESULTS_MD.write_text(head + section + tail)
    print(f"wrote {RESULTS_JSON}, {RESULTS_MD}, {CURVES_PNG} ({len(rows)} rows)")
