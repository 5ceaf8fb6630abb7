"""The fair comparison's report: results/fair_table.json, docs/RESULTS.md's fair-table
section and docs/fair_curves.png, all computed from the runs' result.json and chosen.json.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from distill_lab.fair_table import (
    FAIR_PROTOCOL_COMMIT,
    RUNS_DIR,
    SEEDS,
    SELECTION,
    STUDENTS,
    TEMPERATURES,
    Method,
    cell_results,
    chosen_beta,
    chosen_temperature,
    divergence_score,
    methods,
    read_chosen,
    read_result,
    run_dir,
)
from distill_lab.paper_table.report import compare, hardware, replace_section

RESULTS_JSON = Path("results/fair_table.json")
RESULTS_MD = Path("docs/RESULTS.md")
CURVES_PNG = Path("docs/fair_curves.png")
BEGIN, END = "<!-- fair-table:begin -->", "<!-- fair-table:end -->"
# the columns of a cell: decoding -> (the test scores of a seed's run, its key prefix)
DECODINGS = ("chosen", "greedy", "T=1")
NAMES = {
    "sft": "SFT",
    "seqkd": "SeqKD",
    "supervised_kd-forward_kl": "supervised KD",
    "on_policy_gkd-forward_kl": "on-policy, forward KL",
    "on_policy_gkd-jsd(0.5)": "on-policy, JSD(0.5)",
    "on_policy_gkd-reverse_kl": "on-policy, reverse KL",
    "mixed_gkd-forward_kl": "mixed, forward KL",
    "mixed_gkd-jsd(0.5)": "mixed, JSD(0.5)",
    "mixed_gkd-reverse_kl": "mixed, reverse KL",
}


def summary(values: list[float]) -> dict[str, Any]:
    """Mean, std and standard error over seeds (the shape paper_table.report.compare takes)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "mean": statistics.mean(values),
        "std": std,
        "se": std / math.sqrt(len(values)),
        "seeds": values,
    }


def _test_scores(result: dict[str, Any], chosen: dict[str, Any], decoding: str) -> dict:
    """A run's test metrics (faithful, chrf) under one of DECODINGS."""
    if decoding == "chosen":
        return chosen["test"]
    prefix = "" if decoding == "greedy" else "sampled_"
    return {name: result["test"][prefix + name] for name in ("faithful", "chrf")}


def cells(runs_dir: Path = RUNS_DIR) -> list[dict[str, Any]]:
    """One entry per finished cell (task, student, method): its chosen temperature, the
    validation means per temperature, and the test summaries per decoding and metric."""
    beta = chosen_beta(runs_dir)
    found = []
    for task, students in STUDENTS.items():
        for student in students:
            for method in methods(task, student, beta):
                results = cell_results(task, student, method, runs_dir)
                if results is None:
                    continue
                outs = [run_dir(task, student, method.label, s, runs_dir) for s in SEEDS]
                chosen = [read_chosen(out) for out in outs]
                if any(c is None for c in chosen):
                    continue
                found.append(_cell(task, student, method, results, chosen))
    return found


def _cell(
    task: str, student: str, method: Method, results: list[dict], chosen: list[dict]
) -> dict[str, Any]:
    validation = {
        f"{t:g}": statistics.mean(r["validation"][f"{t:g}"]["faithful"] for r in results)
        for t in (0.0, *TEMPERATURES)
    }
    test = {
        decoding: {
            metric: summary([_test_scores(r, c, decoding)[metric] for r, c in zip(results, chosen)])
            for metric in ("faithful", "chrf")
        }
        for decoding in DECODINGS
    }
    curves = [c["validation_curve"] for c in chosen]
    return {
        "task": task,
        "student": student,
        **method.fields(),
        "temperature": chosen_temperature(results),
        "divergence_score": (
            divergence_score(results)
            if (task, student) == SELECTION and method.method == "on_policy_gkd"
            else None
        ),
        "validation_faithful": validation,
        "test": test,
        "curve": [
            [curves[0][i][0], statistics.mean(c[i][1] for c in curves)]
            for i in range(len(curves[0]))
        ],
        "forward_kl": statistics.mean(r["test"]["forward_kl"] for r in results),
        "reverse_kl": statistics.mean(r["test"]["reverse_kl"] for r in results),
        "wall_s": sum(r["wall_s"] for r in results) + sum(c["wall_s"] for c in chosen),
    }


def _fmt(entry: dict[str, Any]) -> str:
    return f"{entry['mean']:.2f} ± {entry['se']:.2f}"


def cell_table(task: str, student: str, found: list[dict[str, Any]]) -> str:
    """Markdown: every method of (task, student), its temperature and test metrics."""
    lines = [
        "| method | T chosen | faithful at T | greedy | at T = 1 | chrF at T | "
        "validation at T | rev KL (T = 1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    reference = {
        role: read_result(RUNS_DIR / task / f"reference-{role}") for role in ("teacher", student)
    }
    for role, result in reference.items():
        if result is not None:
            test = result["test"]
            name = "teacher" if role == "teacher" else "student init"
            greedy, sampled = test["0"]["faithful"], test["1"]["faithful"]
            cells_text = [name, "", "", f"{greedy:.2f}", f"{sampled:.2f}", "", "", ""]
            lines.append("| " + " | ".join(cells_text) + " |")
    for cell in found:
        if (cell["task"], cell["student"]) != (task, student):
            continue
        key = f"{cell['temperature']:g}"
        faithful = {d: cell["test"][d]["faithful"] for d in DECODINGS}
        cells_text = [
            NAMES.get(cell["label"], cell["label"]),
            key,
            f"**{_fmt(faithful['chosen'])}**",
            _fmt(faithful["greedy"]),
            _fmt(faithful["T=1"]),
            _fmt(cell["test"]["chosen"]["chrf"]),
            f"{cell['validation_faithful'][key]:.2f}",
            f"{cell['reverse_kl']:.3f}",
        ]
        lines.append("| " + " | ".join(cells_text) + " |")
    return "\n".join(lines)


def selection_table(found: list[dict[str, Any]]) -> str:
    """Markdown: the validation means the temperatures (and the divergence) were chosen on."""
    temperatures = [f"{t:g}" for t in (0.0, *TEMPERATURES)]
    header = " | ".join("greedy" if t == "0" else f"T = {t}" for t in temperatures)
    lines = [
        f"| task, student, method | {header} | chosen T | divergence score |",
        "|---|" + "---|" * (len(temperatures) + 2),
    ]
    for cell in found:
        values = [f"{cell['validation_faithful'][t]:.2f}" for t in temperatures]
        score = cell["divergence_score"]
        where = f"{cell['task']}, {cell['student']}, {NAMES.get(cell['label'], cell['label'])}"
        extra = [f"{cell['temperature']:g}", "" if score is None else f"{score:.2f}"]
        lines.append("| " + " | ".join([where, *values, *extra]) + " |")
    return "\n".join(lines)


# Claim -> (method a, method b, decoding): "a higher than b" (docs/RESULTS.md's protocol)
def claims(beta: float) -> dict[str, tuple[str, str, str]]:
    on_policy = Method("on_policy_gkd", beta, 1.0).label
    supervised = Method("supervised_kd", 0.0, 0.0).label
    return {
        "A: on-policy beats SFT": (on_policy, "sft", "chosen"),
        "B: on-policy beats supervised KD": (on_policy, supervised, "chosen"),
        "C: supervised KD beats SFT": (supervised, "sft", "chosen"),
        "D: on-policy beats SFT greedy": (on_policy, "sft", "greedy"),
        "E: on-policy beats SFT at T = 1": (on_policy, "sft", "T=1"),
    }


def claim_rows(found: list[dict[str, Any]], beta: float) -> tuple[list[str], dict[str, str]]:
    """Markdown rows of every claim at every (task, student), and each claim's verdict:
    reproduced (all pairs), partly (some), not reproduced (none)."""
    by_key = {(c["task"], c["student"], c["label"]): c for c in found}
    pairs = [(task, student) for task, students in STUDENTS.items() for student in students]
    rows, verdicts = [], {}
    for claim, (a, b, decoding) in claims(beta).items():
        held = 0
        for task, student in pairs:
            if (task, student, a) not in by_key or (task, student, b) not in by_key:
                continue
            first = by_key[(task, student, a)]["test"][decoding]["faithful"]
            second = by_key[(task, student, b)]["test"][decoding]["faithful"]
            difference, two_se, verdict = compare(first, second)
            held += verdict == "higher"
            cells_text = [
                claim,
                f"{task}, {student}",
                f"{difference:+.2f}",
                f"{two_se:.2f}",
                verdict,
            ]
            rows.append("| " + " | ".join(cells_text) + " |")
        verdicts[claim] = (
            "reproduced" if held == len(pairs) else "partly" if held else "not reproduced"
        )
    return rows, verdicts


def plot_curves(found: list[dict[str, Any]], path: Path = CURVES_PNG) -> None:
    """Validation faithful vs optimizer step, each method at its chosen temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, student) for task, students in STUDENTS.items() for student in students]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for axis, (task, student) in zip(axes[0], panels):
        for cell in found:
            if (cell["task"], cell["student"]) == (task, student):
                steps, values = zip(*cell["curve"])
                name = NAMES.get(cell["label"], cell["label"])
                axis.plot(steps, values, marker="o", markersize=2,
                          label=f"{name} (T = {cell['temperature']:g})")  # fmt: skip
        axis.set_title(f"{task}, {student}", fontsize=9)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("validation faithful (%), at chosen T, mean of 3 seeds", fontsize=8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def generated_section(command: str, elapsed_s: float | None, found: list[dict]) -> str:
    beta = chosen_beta()
    wall = sum(c["wall_s"] for c in found) / 60
    if elapsed_s is None:
        origin = f"Rebuilt by `{command}` from the per-run results"
    else:
        origin = f"Command: `{command}`, {elapsed_s / 60:.1f} min in the invocation that wrote this"
    parts = [
        BEGIN,
        "<!-- generated by `make fair-table` (distill_lab/fair_table/report.py): edit outside -->",
        f"{origin}; the jobs took {wall:.1f} min of run time in all. Seeds: "
        f"{', '.join(map(str, SEEDS))}. Hardware: {hardware()}.",
        "",
        f"Protocol: declared in commit {FAIR_PROTOCOL_COMMIT} (the section above), before "
        "the first run of this grid.",
    ]
    if beta is not None:
        chosen = Method("on_policy_gkd", beta, 1.0).divergence
        parts += ["", f"Chosen on-policy divergence (medium student, validation): {chosen}."]
    parts += [
        "",
        "Test split (1,000 prompts), faithful %, mean ± standard error over the 3 seeds, "
        "each method sampled at its own temperature T (chosen on validation), greedy, and "
        "at T = 1 (the paper's setting); chrF at T; the validation mean it was chosen on; "
        "per-token KL(student || teacher) on its T = 1 samples. Teacher and student init: "
        "one seed, no selection.",
    ]
    for task, students in STUDENTS.items():
        for student in students:
            if any((c["task"], c["student"]) == (task, student) for c in found):
                parts += ["", f"### {task}, {student}", "", cell_table(task, student, found)]
    if beta is not None:
        rows, verdicts = claim_rows(found, beta)
        parts += [
            "",
            "### The declared claims",
            "",
            'Difference of the means, and two standard errors of it: "higher" only beyond.',
            "",
            "| claim | task, student | difference | 2 SE | verdict |",
            "|---|---|---|---|---|",
            *rows,
            "",
            *[f"- **{claim}**: {verdict}." for claim, verdict in verdicts.items()],
        ]
    parts += [
        "",
        "### The selection (validation, 500 prompts, final checkpoint, mean of 3 seeds)",
        "",
        selection_table(found),
        "",
        f"![validation faithful at each method's chosen temperature]({CURVES_PNG.name})",
        END,
    ]
    return "\n".join(parts)


def write_report(command: str, elapsed_s: float | None) -> None:
    found = cells()
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(found, indent=2) + "\n")
    plot_curves(found)
    section = generated_section(command, elapsed_s, found)
    RESULTS_MD.write_text(replace_section(RESULTS_MD.read_text(), BEGIN, END, section))
    print(f"wrote {RESULTS_JSON}, {RESULTS_MD}, {CURVES_PNG} ({len(found)} cells)")
