"""The paper table: the pre-declared grid, the aggregation (against statistics computed
here), one real run through the command's own path, and docs/RESULTS.md agreeing with
results/paper_table.json and with the committed per-run results."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from student_trainer import paper_table, report
from student_trainer.paper_table import ON_POLICY_BETAS, SEEDS, Method, grid, run_dir
from student_trainer.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent


def test_grid_is_the_issues_grid():
    labels = [m.label for m in grid("translation", None)]
    assert labels == [
        "sft",
        "seqkd",
        "supervised_kd-forward_kl",
        "on_policy_gkd-forward_kl",
        "on_policy_gkd-reverse_kl",
        "on_policy_gkd-jsd(0.1)",
        "on_policy_gkd-jsd(0.5)",
        "on_policy_gkd-jsd(0.9)",
    ]
    assert grid("translation", 0.9)[-1] == Method("mixed_gkd", 0.9, 0.5)
    assert [m.label for m in grid("arithmetic", 0.1)] == [
        "sft",
        "supervised_kd-forward_kl",
        "on_policy_gkd-jsd(0.1)",
    ]
    assert Method("supervised_kd", 0.0, 0.0).overrides() == [
        "method.name=gkd",
        "method.beta=0.0",
        "method.lmbda=0.0",
    ]
    assert Method("seqkd").overrides() == ["method.name=seqkd"]


def _fake_runs(root: Path, values: dict[tuple[str, str], list[float]], refs) -> None:
    for (task, label), per_seed in values.items():
        method = next(m for m in grid(task, 0.5) if m.label == label)
        for seed, value in zip(SEEDS, per_seed):
            out = run_dir(task, label, seed, root)
            out.mkdir(parents=True)
            metrics = {name: value + i for i, name in enumerate(TASKS[task].metrics)}
            metrics.update(forward_kl=0.5 + seed, reverse_kl=0.25)
            result = {
                "task": task,
                "label": label,
                "method": method.method,
                "divergence": method.divergence,
                "lambda": method.lmbda,
                "seed": seed,
                "steps": 10,
                "tokens": 100 + seed,
                "wall_s": 1.0,
                "validation_curve": [[0, 1.0], [10, value]],
                "test": metrics,
            }
            (out / "result.json").write_text(json.dumps(result))
    for (task, role), value in refs.items():
        out = root / task / f"reference-{role}"
        out.mkdir(parents=True)
        metrics = {name: value + i for i, name in enumerate(TASKS[task].metrics)}
        if role == "student":
            metrics.update(forward_kl=0.75, reverse_kl=0.5)
        (out / "result.json").write_text(json.dumps({"task": task, "test": metrics}))


def test_rows_are_mean_std_and_gap_closed_of_the_runs(tmp_path):
    values = {
        ("translation", m.label): [10.0 + i, 20.0 + i, 33.0]
        for i, m in enumerate(grid("translation", None))
    }
    values[("translation", "on_policy_gkd-jsd(0.5)")] = [60.0, 62.0, 64.0]  # the best
    values[("translation", "mixed_gkd-jsd(0.5)")] = [40.0, 41.0, 45.0]
    refs = {("translation", "teacher"): 90.0, ("translation", "student"): 30.0}
    _fake_runs(tmp_path, values, refs)
    assert paper_table.best_beta(tmp_path) == 0.5
    rows, facts = report.table_rows(tmp_path)
    by_key = {(r["method"], r.get("divergence"), r.get("lambda"), r["metric"]): r for r in rows}
    assert by_key[("teacher", None, None, "exact_match")]["mean"] == 90.0
    assert by_key.keys() >= {("student_init", None, None, "chrf")}
    row = by_key[("on_policy_gkd", "jsd(0.5)", 1.0, "exact_match")]
    assert row["mean"] == pytest.approx(62.0)
    assert row["std"] == pytest.approx(statistics.stdev([60.0, 62.0, 64.0]))
    assert row["gap_closed"] == pytest.approx(100 * (62 - 30) / (90 - 30))
    chrf = by_key[("on_policy_gkd", "jsd(0.5)", 1.0, "chrf")]  # metric i is value + i
    assert chrf["gap_closed"] == pytest.approx(100 * (63 - 31) / (91 - 31))
    assert by_key[("mixed_gkd", "jsd(0.5)", 0.5, "exact_match")]["seeds"] == list(SEEDS)
    assert facts["runs"] == 3 * 9
    table = report.markdown_table("translation", rows, facts)
    assert "| on_policy_gkd | jsd(0.5) | 1 | 62.00 ± 2.00 | 53% |" in table
    assert "| 1.500 | 0.250 | 10 | 101 |" in table  # mean KLs over seeds 0.5, 1.5, 2.5
    assert "| student_init |  |  | 30.00 |  | 31.00 |  | 0.750 | 0.500 |" in table


def test_best_beta_needs_every_seed_and_breaks_ties_by_declared_order(tmp_path):
    values = {
        ("translation", Method("on_policy_gkd", b, 1.0).label): [50.0] * 3 for b in ON_POLICY_BETAS
    }
    _fake_runs(tmp_path, values, {})
    assert paper_table.best_beta(tmp_path) == ON_POLICY_BETAS[0]
    (run_dir("translation", "on_policy_gkd-reverse_kl", 2, tmp_path) / "result.json").unlink()
    assert paper_table.best_beta(tmp_path) is None


def test_one_cell_runs_through_the_commands_path(tmp_path, monkeypatch):
    """A real (shrunken) on-policy GKD run from the committed student against the
    committed teacher: result.json holds test metrics equal to an independent evaluation
    of the run's final checkpoint."""
    monkeypatch.chdir(ROOT)
    extra = [
        "optim.steps=2",
        "optim.batch_size=4",
        "run.eval_every=1",
        "run.eval_size=4",
        "task.test_size=8",
        "task.train_size=100",
        "task.validation_size=8",
    ]
    method = Method("on_policy_gkd", 0.5, 1.0)
    result = paper_table.run_one("translation", method, 0, tmp_path, extra)
    assert result["steps"] == 2 and [p[0] for p in result["validation_curve"]] == [0, 1, 2]
    assert result["tokens"] > 0 and set(result["test"]) >= {"exact_match", "chrf", "reverse_kl"}
    saved = json.loads(
        (run_dir("translation", method.label, 0, tmp_path) / "result.json").read_text()
    )
    assert saved["test"] == result["test"]
    from student_trainer.checkpoint import latest_checkpoint
    from student_trainer.config import load_config
    from student_trainer.evaluate import evaluate
    from student_trainer.train import Trainer

    config = load_config(paper_table.CONFIGS_DIR / "translation.yaml", [*extra, "run.eval_size=8"])
    out = run_dir("translation", method.label, 0, tmp_path)
    trainer = Trainer(config, resume=str(latest_checkpoint(out)))
    try:
        scores = evaluate(
            trainer.model.eval(),
            trainer.tokenizer,
            trainer.teacher,
            trainer.splits.test,
            config,
            eos_ids=trainer.eos_ids,
            pad_id=trainer.pad_id,
        )
    finally:
        trainer.close()
    assert scores == pytest.approx(result["test"])


def _published_rows() -> list[dict]:
    return json.loads((ROOT / "results" / "paper_table.json").read_text())


def test_published_json_is_recomputed_from_the_committed_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    rows, _ = report.table_rows(paper_table.RUNS_DIR)
    assert [{k: v for k, v in r.items() if k != "label"} for r in rows] == _published_rows()


def test_results_md_agrees_with_the_json():
    rows = _published_rows()
    text = (ROOT / "docs" / "RESULTS.md").read_text()
    generated = text.split(report.BEGIN)[1].split(report.END)[0]
    sections = dict(re.findall(r"### (\w+)\n\n(.*?)(?=\n### |\n!\[|\Z)", generated, re.S))
    assert set(sections) == {r["task"] for r in rows}
    for row in rows:
        lines = sections[row["task"]].splitlines()
        if "std" not in row:
            line = next(x for x in lines if x.startswith(f"| {row['method']} |"))
            assert f" {row['mean']:.2f} " in line
            continue
        lam = f"{row['lambda']:g}" if row["lambda"] is not None else ""
        start = f"| {row['method']} | {row['divergence'] or ''} | {lam} |"
        line = next(x for x in lines if x.startswith(start))
        assert f"{row['mean']:.2f} ± {row['std']:.2f} | {row['gap_closed']:.0f}%" in line
    methods = {r["method"] for r in rows}
    assert methods >= {"teacher", "student_init", "sft", "supervised_kd", "on_policy_gkd"}
