"""The paper table's report: results/paper_table.json, docs/RESULTS.md's table section and
the learning-curve PNG, all computed from the runs' result.json files.

docs/RESULTS.md keeps everything outside its generated section (the analysis), so a
rerun refreshes the numbers without touching the prose.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from distill_lab.paper_table import (
    LR_SWEEP,
    PROTOCOL_COMMIT,
    RUNS_DIR,
    SEEDS,
    STUDENTS,
    SWEEP_METHODS,
    SWEEP_STUDENT,
    TABLE_TASKS,
    Method,
    best_beta,
    chosen_lr,
    final_validation,
    grid,
    read_result,
    run_dir,
    sweep_dir,
)
from student_trainer.tasks import TASKS

RESULTS_JSON = Path("results/paper_table.json")
RESULTS_MD = Path("docs/RESULTS.md")
CURVES_PNG = Path("docs/paper_curves.png")
BEGIN, END = "<!-- paper-table:begin -->", "<!-- paper-table:end -->"
DIVERGENCES = ("forward_kl", "reverse_kl")  # per token, on the student's samples (test)
# Where the declared best-divergence rule chose on a greedy ceiling (forward KL by 0.17
# points, docs/RESULTS.md): the on-policy comparisons are also shown with reverse KL.
POST_HOC_TASKS = ("records",)
DECODINGS = {"greedy": "", "sample": "sampled_"}  # decoding -> prefix of the metric's key
METRIC_LABELS = {
    "exact_match": "exact match",
    "chrf": "chrF",
    "accuracy": "accuracy",
    "faithful": "faithful",
}


def gap_closed(mean: float, student_init: float, teacher: float) -> float:
    """Percent of the teacher - student-init gap this mean closes (negative: it widened)."""
    return 100.0 * (mean - student_init) / (teacher - student_init)


def _parameters(task: str, role: str) -> int | None:
    summary = Path("models") / task / role / "pretrain.json"
    return json.loads(summary.read_text())["parameters"] if summary.is_file() else None


def _value(test: dict[str, float], metric: str, decoding: str) -> float:
    return test[DECODINGS[decoding] + metric]


def table_rows(runs_dir: Path = RUNS_DIR) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The JSON rows (one per task, student, method, metric and decoding), and per-cell
    facts (steps, tokens, divergences, curves) for the markdown and the plot."""
    rows: list[dict[str, Any]] = []
    facts: dict[str, Any] = {"wall_s": 0.0, "runs": 0, "cells": {}, "init": {}, "lr": {}}
    for task in TABLE_TASKS:
        metrics = list(TASKS[task].metrics)
        teacher = read_result(runs_dir / task / "reference-teacher")
        if teacher is None:
            continue
        rows += [
            {"task": task, "student_size": None, "method": "teacher", "metric": m,
             "decoding": d, "mean": _value(teacher["test"], m, d)}
            for m in metrics for d in DECODINGS
        ]  # fmt: skip
        facts["lr"][task] = chosen_lr(task, runs_dir)
        beta = best_beta(task, runs_dir)
        for student in STUDENTS[task]:
            init = read_result(runs_dir / task / f"reference-{student}")
            if init is None:
                continue
            facts["init"][(task, student)] = init["test"]
            rows += [
                {"task": task, "student_size": student, "method": "student_init", "metric": m,
                 "decoding": d, "mean": _value(init["test"], m, d)}
                for m in metrics for d in DECODINGS
            ]  # fmt: skip
            for method in grid(task, beta):
                results = [
                    read_result(run_dir(task, student, method.label, s, runs_dir)) for s in SEEDS
                ]
                if any(r is None for r in results):
                    continue
                facts["wall_s"] += sum(r["wall_s"] for r in results)
                facts["runs"] += len(results)
                facts["cells"][(task, student, method.label)] = {
                    "steps": results[0]["steps"],
                    **{k: statistics.mean(r["test"][k] for r in results) for k in DIVERGENCES},
                    "tokens": statistics.mean(r["tokens"] for r in results),
                    "curves": [r["validation_curves"] for r in results],
                }
                for m in metrics:
                    for d in DECODINGS:
                        values = [_value(r["test"], m, d) for r in results]
                        mean = statistics.mean(values)
                        start, top = _value(init["test"], m, d), _value(teacher["test"], m, d)
                        rows.append(
                            {
                                "task": task,
                                "student_size": student,
                                "method": method.method,
                                "divergence": method.divergence,
                                "lambda": method.lmbda,
                                "seeds": list(SEEDS),
                                "metric": m,
                                "decoding": d,
                                "mean": mean,
                                "std": statistics.stdev(values),
                                "gap_closed": gap_closed(mean, start, top),
                                "label": method.label,
                            }
                        )
    return rows, facts


def _cell(row: dict[str, Any], gap: bool) -> str:
    text = f"{row['mean']:.2f} ± {row['std']:.2f}"
    return f"{text} ({row['gap_closed']:.0f}%)" if gap else text


def markdown_table(
    task: str, student: str, rows: list[dict[str, Any]], facts: dict[str, Any]
) -> str:
    """One student's table: every metric under both decodings; the primary metric also
    shows the share of the teacher - student-init gap closed."""
    metrics = list(TASKS[task].metrics)
    columns = [(m, d) for m in metrics for d in DECODINGS]
    head = ["method", "divergence", "λ"]
    head += [f"{METRIC_LABELS[m]}, {d}" for m, d in columns]
    head += ["fwd KL", "rev KL", "steps", "tokens / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mine = [r for r in rows if r["task"] == task and r["student_size"] in (None, student)]
    refs = {(r["method"], r["metric"], r["decoding"]): r["mean"] for r in mine if "std" not in r}
    for name in ("teacher", "student_init"):
        cells = [name, "", ""] + [f"{refs[(name, m, d)]:.2f}" for m, d in columns]
        init = facts["init"][(task, student)] if name == "student_init" else {}
        cells += [f"{init[k]:.3f}" if k in init else "" for k in DIVERGENCES]
        lines.append("| " + " | ".join([*cells, "", ""]) + " |")
    labels = dict.fromkeys(r["label"] for r in mine if "label" in r)
    for label in labels:
        by_key = {(r["metric"], r["decoding"]): r for r in mine if r.get("label") == label}
        first = by_key[columns[0]]
        lam = "" if first["lambda"] is None else f"{first['lambda']:g}"
        cells = [first["method"], first["divergence"] or "", lam]
        cells += [_cell(by_key[(m, d)], gap=m == metrics[0]) for m, d in columns]
        cell = facts["cells"][(task, student, label)]
        cells += [f"{cell[k]:.3f}" for k in DIVERGENCES]
        cells += [str(cell["steps"]), f"{cell['tokens']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, str]:
    """(mean a - mean b, two standard errors of that difference over the seeds, verdict):
    "higher" / "lower" beyond two standard errors, else "no difference detected"."""
    difference = a["mean"] - b["mean"]
    two_se = 2 * math.sqrt(a["std"] ** 2 / len(a["seeds"]) + b["std"] ** 2 / len(b["seeds"]))
    if difference > two_se:
        return difference, two_se, "higher"
    if difference < -two_se:
        return difference, two_se, "lower"
    return difference, two_se, "no difference detected"


def on_policy_pairs(beta: float, name: str) -> list[tuple[str, str, str]]:
    """On-policy GKD (lambda = 1) at `beta` against both baselines: (a, b, what) labels."""
    on_policy = Method("on_policy_gkd", beta, 1.0).label
    return [
        (on_policy, "supervised_kd-forward_kl", f"on-policy ({name}) vs supervised KD"),
        (on_policy, "sft", f"on-policy ({name}) vs SFT"),
    ]


def protocol_pairs(beta: float | None) -> list[tuple[str, str, str]]:
    """The comparisons RESULTS.md's protocol declares, with the selected divergence."""
    pairs = [] if beta is None else on_policy_pairs(beta, "best divergence")
    return [
        *pairs,
        ("supervised_kd-forward_kl", "sft", "supervised KD vs SFT"),
        (
            "on_policy_gkd-reverse_kl",
            "on_policy_gkd-forward_kl",
            "on-policy reverse KL vs forward KL",
        ),
    ]


def claim_lines(
    task: str, student: str, rows: list[dict[str, Any]], pairs: list[tuple[str, str, str]]
) -> list[str]:
    """Comparisons (a vs b) for one student on the primary metric, under both decodings
    (RESULTS.md "What counts as reproducing"): each a markdown row."""
    metric = TASKS[task].metric_name
    cells = {
        (r["label"], r["decoding"]): r
        for r in rows
        if r["task"] == task and r["student_size"] == student and r.get("metric") == metric
        and "label" in r
    }  # fmt: skip
    where = task if student == "student" else f"{task}, {student}"
    lines = []
    for a, b, name in pairs:
        for decoding in DECODINGS:
            if (a, decoding) in cells and (b, decoding) in cells:
                difference, two_se, verdict = compare(cells[(a, decoding)], cells[(b, decoding)])
                cells_text = [where, name, decoding, f"{difference:+.2f}", f"{two_se:.2f}", verdict]
                lines.append("| " + " | ".join(cells_text) + " |")
    return lines


def sweep_table(task: str, runs_dir: Path = RUNS_DIR) -> str | None:
    """The learning-rate sweep's final validation metrics, or None before it has run."""
    header = [f"lr ({SWEEP_STUDENT}, seed 0)", *(m.label for m in SWEEP_METHODS), "mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for lr in LR_SWEEP.get(task, ()):
        results = [read_result(sweep_dir(task, lr, m.label, runs_dir)) for m in SWEEP_METHODS]
        if any(r is None for r in results):
            return None
        finals = [final_validation(r) for r in results]
        cells = [f"{lr:g}", *(f"{v:.2f}" for v in finals), f"{statistics.mean(finals):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if LR_SWEEP.get(task) else None


def plot_curves(facts: dict[str, Any], path: Path = CURVES_PNG) -> None:
    """Validation metric vs optimizer step, mean over seeds: one column per task and
    student, greedy decoding on the top row, sampling below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, student) for task in TABLE_TASKS for student in STUDENTS[task]]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.5), squeeze=False)
    for column, (task, student) in enumerate(panels):
        metric = METRIC_LABELS[TASKS[task].metric_name]
        for row, decoding in enumerate(DECODINGS):
            axis = axes[row][column]
            for (cell_task, cell_student, label), cell in facts["cells"].items():
                if (cell_task, cell_student) != (task, student):
                    continue
                curves = [c[decoding] for c in cell["curves"]]
                steps = [point[0] for point in curves[0]]
                means = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
                axis.plot(steps, means, marker="o", markersize=2, label=label)
            title = task if student == "student" else f"{task}, {student}"
            axis.set_title(f"{title}: {decoding}", fontsize=9)
            axis.set_xlabel("optimizer step")
            axis.set_ylabel(f"validation {metric} (%), mean of 3 seeds", fontsize=8)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def hardware() -> str:
    """The CPU, cores and torch version a report's timings come from."""
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


def _student_heading(task: str, student: str) -> str:
    if student == "student":
        return f"### {task}"
    parameters = _parameters(task, student)
    size = f" ({parameters / 1000:.0f}k parameters)" if parameters else ""
    return f"### {task}, {student}{size}"


def generated_section(
    command: str, elapsed_s: float | None, rows: list[dict[str, Any]], facts: dict[str, Any]
) -> str:
    """`elapsed_s` None: the report was rebuilt from the per-run results, nothing was run."""
    run_time = f"the {facts['runs']} runs took {facts['wall_s'] / 60:.1f} min of run time in all"
    if elapsed_s is None:
        origin = f"Rebuilt by `{command}` from the per-run results ({run_time})."
    else:
        origin = (
            f"Command: `{command}` (elapsed {elapsed_s / 60:.1f} min in the invocation that "
            f"wrote this; {run_time})."
        )
    configs = ", ".join(f"`configs/paper/{task}.yaml`" for task in TABLE_TASKS)
    parts = [
        BEGIN,
        "<!-- generated by `make paper-table` (distill_lab/paper_table/report.py): "
        "edit outside -->",
        f"{origin} Seeds: {', '.join(map(str, SEEDS))}. Hardware: {hardware()}.",
        "",
        f"Protocol: declared in commit {PROTOCOL_COMMIT} (the section above), before the "
        "first run of this grid.",
        "",
        f"Configs: {configs} (within a task and student every method has the same "
        "initialisation, steps, prompts per step and learning rate). Metrics on the test "
        "split, mean ± std over seeds, with greedy decoding and with samples at temperature "
        "1; (n%) = gap closed = (method - student init) / (teacher - student init). fwd KL "
        "/ rev KL: per-token KL(teacher || student) and KL(student || teacher) on the "
        "student's own samples (temperature 1) of the test prompts, mean over seeds.",
    ]
    for task in TABLE_TASKS:
        selections = []
        if facts["lr"].get(task) is not None:
            selections.append(f"learning rate {facts['lr'][task]:g}")
        beta = best_beta(task)
        if beta is not None:
            selections.append(f"best on-policy divergence beta = {beta:g}")
        if selections and any(r["task"] == task for r in rows):
            parts.append(f"- {task}: {', '.join(selections)}.")
    for task in TABLE_TASKS:
        sweep = sweep_table(task)
        if sweep is not None:
            metric = METRIC_LABELS[TASKS[task].metric_name]
            parts += ["", f"Learning-rate sweep, {task} (final validation {metric}, greedy):"]
            parts += ["", sweep]
    for task in TABLE_TASKS:
        for student in STUDENTS[task]:
            if (task, student) in facts["init"]:
                table = markdown_table(task, student, rows, facts)
                parts += ["", _student_heading(task, student), "", table]
    comparisons = [
        (
            "### The protocol's comparisons (primary metric, test split)",
            lambda task: protocol_pairs(best_beta(task)),
        ),
        (
            "### Added after the runs, not declared: the same comparisons with reverse KL",
            lambda task: on_policy_pairs(1.0, "reverse KL") if task in POST_HOC_TASKS else [],
        ),
    ]
    for heading, pairs_of in comparisons:
        lines = [
            line
            for task in TABLE_TASKS
            for student in STUDENTS[task]
            for line in claim_lines(task, student, rows, pairs_of(task))
        ]
        if lines:
            parts += [
                "",
                heading,
                "",
                'Difference of the means over seeds, and two standard errors of it: "higher" / '
                '"lower" only beyond those.',
                "",
                "| task, student | comparison | decoding | difference | 2 SE | verdict |",
                "|---|---|---|---|---|---|",
                *lines,
            ]
    parts += ["", f"![validation metric vs optimizer step]({CURVES_PNG.name})", END]
    return "\n".join(parts)


def replace_section(text: str, begin: str, end: str, section: str) -> str:
    """`text` with its generated section (from `begin` to `end`, markers included) replaced
    by `section`: the prose around it is kept, so a rerun refreshes only the numbers."""
    if begin not in text:
        raise ValueError(f"no {begin} marker: where should the generated section go?")
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    return head + section + tail


def write_report(command: str, elapsed_s: float | None) -> None:
    rows, facts = table_rows()
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    public = [{k: v for k, v in row.items() if k != "label"} for row in rows]
    RESULTS_JSON.write_text(json.dumps(public, indent=2) + "\n")
    plot_curves(facts)
    section = generated_section(command, elapsed_s, rows, facts)
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    RESULTS_MD.write_text(replace_section(text, BEGIN, END, section))
    print(f"wrote {RESULTS_JSON}, {RESULTS_MD}, {CURVES_PNG} ({len(rows)} rows)")
