"""The paper table: the pre-declared grid, the aggregation (against statistics computed
here), one real run through the command's own path, and docs/RESULTS.md agreeing with
results/paper_table.json and with the committed per-run results."""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from pathlib import Path

import pytest

from distill_lab import paper_table
from distill_lab.paper_table import (
    LR_SWEEP,
    SEEDS,
    STUDENTS,
    SWEEP_METHODS,
    SWEEP_STUDENT,
    Method,
    grid,
    report,
    run_dir,
)
from student_trainer.config import load_config, objective_from
from student_trainer.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent


def test_grid_is_the_protocols_grid():
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
    assert [m.label for m in grid("records", 1.0)] == [
        "sft",
        "seqkd",
        "supervised_kd-forward_kl",
        "on_policy_gkd-forward_kl",
        "on_policy_gkd-jsd(0.5)",
        "on_policy_gkd-reverse_kl",
        "mixed_gkd-reverse_kl",
    ]
    assert [m.label for m in grid("arithmetic", 0.1)] == [
        "sft",
        "supervised_kd-forward_kl",
        "on_policy_gkd-jsd(0.1)",
    ]
    assert STUDENTS["records"] == ("student-small", "student-medium", "student-large")
    assert Method("supervised_kd", 0.0, 0.0).overrides() == [
        "method.name=gkd",
        "method.loss=forward_kl",
        "method.lmbda=0.0",
    ]
    assert Method("on_policy_gkd", 0.9, 1.0).overrides() == [
        "method.name=gkd",
        "method.loss=jsd",
        "method.loss_args.beta=0.9",
        "method.lmbda=1.0",
    ]
    assert Method("seqkd").overrides() == ["method.name=seqkd"]


@pytest.mark.parametrize("task", paper_table.TABLE_TASKS)
def test_every_method_trains_the_objective_its_committed_runs_were_trained_with(task, monkeypatch):
    """The committed runs chose their loss with method.beta and the configs'
    method.support=full; the table's method.loss keys select the same objective."""
    monkeypatch.chdir(ROOT)
    for method in grid(task, 0.5):
        config = load_config(paper_table.CONFIGS_DIR / f"{task}.yaml", method.overrides())
        legacy = dataclasses.replace(
            config.method, loss="", loss_args={}, beta=method.beta, support="full"
        )
        assert objective_from(config.method) == objective_from(legacy), method.label


def _result(task, student, method, seed, value, final=None):
    metrics = {}
    for i, name in enumerate(TASKS[task].metrics):
        metrics[name] = value + i
        metrics[f"sampled_{name}"] = value / 2 + i
    metrics.update(forward_kl=0.5 + seed, reverse_kl=0.25)
    final = value if final is None else final
    return {
        "task": task,
        "student": student,
        "label": method.label,
        "method": method.method,
        "divergence": method.divergence,
        "lambda": method.lmbda,
        "seed": seed,
        "steps": 10,
        "tokens": 100 + seed,
        "wall_s": 1.0,
        "validation_curves": {"greedy": [[0, 1.0], [10, final]], "sample": [[0, 0.5], [10, 2]]},
        "test": metrics,
    }


def _write(path: Path, result: dict) -> None:
    path.mkdir(parents=True)
    (path / "result.json").write_text(json.dumps(result))


def _fake_runs(root: Path, values: dict[tuple[str, str, str], list[float]], refs) -> None:
    for (task, student, label), per_seed in values.items():
        method = next(m for m in grid(task, 0.5) if m.label == label)
        for seed, value in zip(SEEDS, per_seed):
            _write(
                run_dir(task, student, label, seed, root),
                _result(task, student, method, seed, value),
            )
    for (task, role), value in refs.items():
        metrics = {}
        for i, name in enumerate(TASKS[task].metrics):
            metrics.update({name: value + i, f"sampled_{name}": value - 10 + i})
        if role != "teacher":
            metrics.update(forward_kl=0.75, reverse_kl=0.5)
        _write(root / task / f"reference-{role}", {"task": task, "test": metrics})


def _sweep(root: Path, finals: dict[float, list[float]]) -> None:
    for lr, per_method in finals.items():
        for method, final in zip(SWEEP_METHODS, per_method):
            result = _result("records", SWEEP_STUDENT, method, 0, 0.0, final)
            _write(paper_table.sweep_dir("records", lr, method.label, root), result)


def test_rows_are_mean_std_and_gap_closed_of_the_runs_for_both_decodings(tmp_path):
    values = {
        ("translation", "student", m.label): [10.0 + i, 20.0 + i, 33.0]
        for i, m in enumerate(grid("translation", None))
    }
    values[("translation", "student", "on_policy_gkd-jsd(0.5)")] = [60.0, 62.0, 64.0]  # best
    values[("translation", "student", "mixed_gkd-jsd(0.5)")] = [40.0, 41.0, 45.0]
    refs = {("translation", "teacher"): 90.0, ("translation", "student"): 30.0}
    _fake_runs(tmp_path, values, refs)
    assert paper_table.best_beta("translation", tmp_path) == 0.5
    rows, facts = report.table_rows(tmp_path)
    by_key = {
        (r["method"], r.get("divergence"), r.get("lambda"), r["metric"], r["decoding"]): r
        for r in rows
    }
    assert by_key[("teacher", None, None, "exact_match", "greedy")]["mean"] == 90.0
    assert by_key[("teacher", None, None, "exact_match", "sample")]["mean"] == 80.0
    assert by_key.keys() >= {("student_init", None, None, "chrf", "sample")}
    row = by_key[("on_policy_gkd", "jsd(0.5)", 1.0, "exact_match", "greedy")]
    assert row["mean"] == pytest.approx(62.0) and row["student_size"] == "student"
    assert row["std"] == pytest.approx(statistics.stdev([60.0, 62.0, 64.0]))
    assert row["gap_closed"] == pytest.approx(100 * (62 - 30) / (90 - 30))
    sampled = by_key[("on_policy_gkd", "jsd(0.5)", 1.0, "exact_match", "sample")]
    assert sampled["mean"] == pytest.approx(31.0)  # sampled values are value / 2
    assert sampled["gap_closed"] == pytest.approx(100 * (31 - 20) / (80 - 20))
    chrf = by_key[("on_policy_gkd", "jsd(0.5)", 1.0, "chrf", "greedy")]  # metric i is value + i
    assert chrf["gap_closed"] == pytest.approx(100 * (63 - 31) / (91 - 31))
    assert by_key[("mixed_gkd", "jsd(0.5)", 0.5, "exact_match", "greedy")]["seeds"] == list(SEEDS)
    assert facts["runs"] == 3 * 9
    table = report.markdown_table("translation", "student", rows, facts)
    assert "| on_policy_gkd | jsd(0.5) | 1 | 62.00 ± 2.00 (53%) | 31.00 ± 1.00 (18%) |" in table
    assert "| 1.500 | 0.250 | 10 | 101 |" in table  # mean KLs over seeds 0.5, 1.5, 2.5
    assert "| student_init |  |  | 30.00 | 20.00 | 31.00 | 21.00 | 0.750 | 0.500 |" in table


def test_comparisons_apply_the_two_standard_error_rule(tmp_path):
    values = {
        ("translation", "student", m.label): [50.0, 51.0, 52.0] for m in grid("translation", None)
    }
    values[("translation", "student", "on_policy_gkd-jsd(0.5)")] = [60.0, 62.0, 64.0]  # best
    values[("translation", "student", "supervised_kd-forward_kl")] = [50.0, 55.0, 63.0]
    _fake_runs(
        tmp_path, values, {("translation", "teacher"): 90.0, ("translation", "student"): 30.0}
    )
    rows, _ = report.table_rows(tmp_path)
    lines = report.claim_lines("translation", "student", rows, report.protocol_pairs(0.5))
    sft_sd, kd_sd = statistics.stdev([50.0, 51.0, 52.0]), statistics.stdev([50.0, 55.0, 63.0])
    two_se = 2 * (2.0**2 / 3 + kd_sd**2 / 3) ** 0.5  # 62 - 56 = 6 is within it
    assert (
        f"| translation | on-policy (best divergence) vs supervised KD | greedy | +6.00 | "
        f"{two_se:.2f} | no difference detected |" in lines
    )
    two_se = 2 * (2.0**2 / 3 + sft_sd**2 / 3) ** 0.5
    assert (
        f"| translation | on-policy (best divergence) vs SFT | greedy | +11.00 | {two_se:.2f} | "
        "higher |" in lines
    )
    assert any(
        line.startswith("| translation | on-policy reverse KL vs forward KL | sample |")
        for line in lines
    )
    low = {"mean": 1.0, "std": 0.1, "seeds": [0, 1, 2]}
    assert report.compare(low, {**low, "mean": 2.0})[2] == "lower"


def test_best_beta_needs_every_seed_and_breaks_ties_by_declared_order(tmp_path):
    betas = paper_table.ON_POLICY_BETAS["records"]
    values = {
        ("records", "student-medium", Method("on_policy_gkd", b, 1.0).label): [50.0] * 3
        for b in betas
    }
    values[("records", "student-small", "on_policy_gkd-reverse_kl")] = [
        90.0
    ] * 3  # not chosen there
    _fake_runs(tmp_path, values, {})
    assert paper_table.best_beta("records", tmp_path) == betas[0]
    label = "on_policy_gkd-reverse_kl"
    (run_dir("records", "student-medium", label, 2, tmp_path) / "result.json").unlink()
    assert paper_table.best_beta("records", tmp_path) is None
    assert paper_table.best_beta("arithmetic", tmp_path) is None  # translation decides


def test_the_sweep_picks_one_learning_rate_for_all_methods(tmp_path):
    assert paper_table.chosen_lr("records", tmp_path) is None
    _sweep(tmp_path, {3e-4: [60.0, 70.0], 1e-3: [80.0, 55.0], 3e-3: [40.0, 30.0]})
    # means 65, 67.5, 35: 1e-3, although sft alone would pick 1e-3 and on-policy 3e-4
    assert paper_table.chosen_lr("records", tmp_path) == 1e-3
    table = report.sweep_table("records", tmp_path)
    assert "| 0.001 | 80.00 | 55.00 | 67.50 |" in table and table.count("\n") == 4
    translation = paper_table.load_config(paper_table.CONFIGS_DIR / "translation.yaml")
    assert paper_table.chosen_lr("translation", tmp_path) == translation.optim.lr


def test_runs_are_planned_as_their_rules_become_decidable(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    planned = paper_table.planned_runs(["records"], tmp_path)
    assert [(r.test, r.lr) for r in planned] == [
        (False, lr) for lr in LR_SWEEP["records"] for _ in SWEEP_METHODS
    ]
    _sweep(tmp_path, {3e-4: [60.0, 70.0], 1e-3: [80.0, 55.0], 3e-3: [40.0, 30.0]})
    planned = [r for r in paper_table.planned_runs(["records"], tmp_path) if r.test]
    assert {r.lr for r in planned} == {1e-3}
    assert len(planned) == 3 * 6 * 3  # students x methods without mixed x seeds
    assert planned[0].student == "student-medium" and planned[0].method.method == "on_policy_gkd"
    values = {
        ("records", "student-medium", Method("on_policy_gkd", b, 1.0).label): [50.0 + b] * 3
        for b in paper_table.ON_POLICY_BETAS["records"]
    }
    _fake_runs(tmp_path, values, {})
    planned = [r for r in paper_table.planned_runs(["records"], tmp_path) if r.test]
    mixed = [r for r in planned if r.method.method == "mixed_gkd"]
    assert len(mixed) == 3 * 3 and {r.method.beta for r in mixed} == {1.0}


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
    out = run_dir("translation", "student", method.label, 0, tmp_path)
    result = paper_table.run_one("translation", "student", method, 0, out, lr=3e-4, extra=extra)
    curves = result["validation_curves"]
    assert result["steps"] == 2 and [p[0] for p in curves["greedy"]] == [0, 1, 2]
    assert [p[0] for p in curves["sample"]] == [0, 1, 2] and result["lr"] == 3e-4
    assert result["tokens"] > 0
    assert set(result["test"]) >= {"exact_match", "chrf", "sampled_exact_match", "reverse_kl"}
    saved = json.loads((out / "result.json").read_text())
    assert saved["test"] == result["test"]
    from student_trainer.checkpoint import latest_checkpoint
    from student_trainer.evaluate import evaluate
    from student_trainer.train import Trainer

    config = load_config(paper_table.CONFIGS_DIR / "translation.yaml", [*extra, "run.eval_size=8"])
    trainer = Trainer(config, resume=str(latest_checkpoint(out)))
    try:
        scores = evaluate(
            trainer.student.model.eval(),
            trainer.student.tokenizer,
            trainer.teacher,
            trainer.splits.test,
            config,
            eos_ids=trainer.student.eos_ids,
            pad_id=trainer.student.pad_id,
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


def _section(row: dict) -> str:
    student = row["student_size"]
    return row["task"] if student in (None, "student") else f"{row['task']}, {student}"


def test_results_md_agrees_with_the_json():
    rows = _published_rows()
    text = (ROOT / "docs" / "RESULTS.md").read_text()
    generated = text.split(report.BEGIN)[1].split(report.END)[0]
    found = re.findall(
        r"### ([\w-]+(?:, [\w-]+)?)[^\n]*\n\n(.*?)(?=\n### |\n!\[|\Z)", generated, re.S
    )
    sections = {name: body for name, body in found if name.split(",")[0] in TASKS}
    assert set(sections) == {_section(r) for r in rows if r["student_size"]}
    for row in rows:
        names = (
            [_section(row)]
            if row["student_size"]
            else [n for n in sections if n.startswith(row["task"])]
        )
        for name in names:
            lines = sections[name].splitlines()
            if "std" not in row:
                line = next(x for x in lines if x.startswith(f"| {row['method']} |"))
                assert f" {row['mean']:.2f} " in line
                continue
            lam = f"{row['lambda']:g}" if row["lambda"] is not None else ""
            start = f"| {row['method']} | {row['divergence'] or ''} | {lam} |"
            line = next(x for x in lines if x.startswith(start))
            cell = f"{row['mean']:.2f} ± {row['std']:.2f}"
            if row["metric"] == TASKS[row["task"]].metric_name:
                cell += f" ({row['gap_closed']:.0f}%)"
            assert f"| {cell} |" in line
    methods = {r["method"] for r in rows}
    assert methods >= {"teacher", "student_init", "sft", "supervised_kd", "on_policy_gkd"}
    assert {r["decoding"] for r in rows} == {"greedy", "sample"}
