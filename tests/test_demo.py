"""`make demo` shows the cell of the paper table where on-policy distillation pays most."""

from __future__ import annotations

import json
from pathlib import Path

from distill_lab.paper_table import chosen_lr
from student_trainer.config import load_config, objective_from
from student_trainer.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]


def _gain_over_sft(rows: list[dict]) -> dict[tuple[str, str, str], float]:
    """(task, student, divergence) -> on-policy GKD minus SFT, primary metric, sampled."""
    primary = {
        (r["task"], r["student_size"], r["method"], r.get("divergence")): r["mean"]
        for r in rows
        if r["decoding"] == "sample" and r["metric"] == next(iter(TASKS[r["task"]].metrics))
    }
    return {
        (task, student, divergence): mean - primary[(task, student, "sft", None)]
        for (task, student, method, divergence), mean in primary.items()
        if method == "on_policy_gkd"
    }


def test_the_demo_runs_the_table_cell_where_on_policy_distillation_gains_most_over_sft():
    rows = json.loads((REPO / "results" / "paper_table.json").read_text())
    gains = _gain_over_sft(rows)
    task, student, divergence = max(gains, key=gains.get)
    demo = load_config(REPO / "configs" / "demo.yaml")
    loss = objective_from(demo.method)
    assert demo.task.name == task
    assert Path(demo.student.model).name == (student or "student")
    assert (demo.method.name, demo.method.lmbda) == ("gkd", 1.0)
    assert (loss.name if loss.name != "jsd" else f"jsd({loss.beta:g})") == divergence
    assert loss.support == "full"  # as the table's runs (configs/paper/)
    assert demo.optim.lr == chosen_lr(task, REPO / "results" / "paper-runs")
    assert gains[(task, student, divergence)] > 0
