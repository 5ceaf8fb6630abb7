"""The fair comparison (distill_lab/fair_table/): the declared grid, its two selection rules
computed by hand on fabricated runs, the report's claims against the two-standard-error
rule, and one real (shrunken) run through the grid's own path, its numbers checked against
an independent evaluation of its checkpoint."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from distill_lab import fair_table
from distill_lab.fair_table import (
    DIVERGENCE_BETAS,
    SEEDS,
    SELECTION,
    STUDENTS,
    TEMPERATURES,
    Method,
    methods,
    run_dir,
)
from distill_lab.fair_table import report as fair_report

ROOT = Path(__file__).resolve().parent.parent
ON_POLICY = {b: Method("on_policy_gkd", b, 1.0) for b in DIVERGENCE_BETAS}


def _validation(greedy: float, by_temperature: dict[float, float]) -> dict[str, dict]:
    scores = {"0": {"faithful": greedy, "chrf": 50.0}}
    for t in TEMPERATURES:
        scores[f"{t:g}"] = {"faithful": by_temperature.get(t, 0.0), "chrf": 50.0}
    return scores


def _write_run(root: Path, task: str, student: str, method: Method, seed: int, **fields) -> Path:
    out = run_dir(task, student, method.label, seed, root)
    out.mkdir(parents=True, exist_ok=True)
    result = {"label": method.label, "seed": seed, "wall_s": 1.0, **fields}
    (out / "result.json").write_text(json.dumps(result))
    return out


def test_the_grid_is_the_protocols_grid():
    assert SEEDS == (3, 4, 5) and TEMPERATURES == (0.3, 0.5, 0.7, 1.0)
    assert STUDENTS == {
        "records": ("student-medium", "student-large"),
        "records-4to6": ("student-medium",),
    }
    medium = {m.label for m in methods("records", "student-medium", 1.0)}
    assert medium == {
        "sft", "seqkd", "supervised_kd-forward_kl", "on_policy_gkd-forward_kl",
        "on_policy_gkd-jsd(0.5)", "on_policy_gkd-reverse_kl", "mixed_gkd-reverse_kl",
    }  # fmt: skip
    large = {m.label for m in methods("records", "student-large", 0.5)}
    assert large == {
        "sft",
        "seqkd",
        "supervised_kd-forward_kl",
        "on_policy_gkd-jsd(0.5)",
        "mixed_gkd-jsd(0.5)",
    }
    variant = {m.label for m in methods("records-4to6", "student-medium", 0.0)}
    assert variant == {"sft", "supervised_kd-forward_kl", "on_policy_gkd-forward_kl"}
    # before the divergence is chosen, nothing that needs it is planned
    assert {m.label for m in methods("records", "student-large", None)} == {
        "sft", "seqkd", "supervised_kd-forward_kl"
    }  # fmt: skip
    runs = sum(len(methods(t, s, 1.0)) for t, students in STUDENTS.items() for s in students)
    assert runs * len(SEEDS) == 45  # docs/RESULTS.md's protocol


def test_a_cells_temperature_is_its_best_mean_validation_rate_with_ties_to_the_higher():
    per_seed = [{0.3: 80.0, 0.5: 90.0, 0.7: 70.0}, {0.3: 80.0, 0.5: 60.0, 0.7: 95.0}]
    results = [{"validation": _validation(99.0, v)} for v in per_seed]
    # means: 0.3 -> 80, 0.5 -> 75, 0.7 -> 82.5, 1.0 -> 0; greedy never competes
    assert fair_table.chosen_temperature(results) == 0.7
    tied = [{"validation": _validation(0.0, {0.3: 85.0, 0.5: 85.0})}]
    assert fair_table.chosen_temperature(tied) == 0.5


def test_the_divergence_is_chosen_on_greedy_and_its_own_temperature_averaged(tmp_path):
    # forward KL: best sampled (at 0.3) but weak greedy; reverse KL: the best average
    shapes = {0.0: (60.0, {0.3: 90.0}), 0.5: (80.0, {0.5: 70.0}), 1.0: (85.0, {1.0: 70.0})}
    for beta, (greedy, sampled) in shapes.items():
        for seed in SEEDS:
            validation = _validation(greedy, sampled)
            _write_run(tmp_path, *SELECTION, ON_POLICY[beta], seed, validation=validation)
    scores = {beta: (g + max(s.values())) / 2 for beta, (g, s) in shapes.items()}
    assert scores == {0.0: 75.0, 0.5: 75.0, 1.0: 77.5}
    assert fair_table.chosen_beta(tmp_path) == 1.0
    # a tie goes to the earlier declared divergence
    for seed in SEEDS:
        _write_run(tmp_path, *SELECTION, ON_POLICY[1.0], seed, validation=_validation(80, {1: 70}))
    assert fair_table.chosen_beta(tmp_path) == 0.0
    (run_dir(*SELECTION, ON_POLICY[0.5].label, 4, tmp_path) / "result.json").unlink()
    assert fair_table.chosen_beta(tmp_path) is None


def test_jobs_are_planned_as_their_rules_become_decidable(tmp_path):
    planned = fair_table.planned_jobs(tmp_path)
    assert all(job.temperature is None for job in planned)
    assert len(planned) == (6 + 3 + 2) * 3  # no job needs the divergence yet
    assert {job.method for job in planned[:9]} == set(ON_POLICY.values())  # they decide it
    for beta in DIVERGENCE_BETAS:
        for seed in SEEDS:
            validation = _validation(50.0 + beta, {0.7: 60.0})
            _write_run(tmp_path, *SELECTION, ON_POLICY[beta], seed, validation=validation)
    planned = fair_table.planned_jobs(tmp_path)
    scoring = [job for job in planned if job.temperature is not None]
    assert {(job.method.label, job.temperature) for job in scoring} == {
        (m.label, 0.7) for m in ON_POLICY.values()
    }
    assert len(planned) == 45 + 9  # every run, and the 9 finished ones' scoring at T
    mixed = [job for job in planned if job.method.method == "mixed_gkd"]
    assert {job.method.beta for job in mixed} == {1.0} and len(mixed) == 6


def _cell(label: str, faithful: list[float], greedy: list[float], at_one: list[float]) -> dict:
    test = {}
    for decoding, values in (("chosen", faithful), ("greedy", greedy), ("T=1", at_one)):
        test[decoding] = {"faithful": fair_report.summary(values)}
    return {"task": "records", "student": "student-medium", "label": label, "test": test}


def test_claims_apply_the_two_standard_error_rule_at_each_decoding():
    on_policy, supervised = ON_POLICY[1.0].label, "supervised_kd-forward_kl"
    found = [
        _cell(on_policy, [90.0, 91.0, 92.0], [95.0, 95.0, 95.5], [85.0, 86.0, 87.0]),
        _cell("sft", [88.0, 89.0, 90.0], [95.0, 95.5, 95.0], [70.0, 71.0, 72.0]),
        _cell(supervised, [80.0, 95.0, 99.0], [90.0, 90.0, 90.0], [70.0, 70.0, 70.0]),
    ]
    rows, verdicts = fair_report.claim_rows(found, 1.0)
    # A: difference 2.0; SE of each mean is 1/sqrt(3), so two SE of the difference are
    # 2 * sqrt(2/3) = 1.633: higher
    se = statistics.stdev([90.0, 91.0, 92.0]) / 3**0.5
    assert 2 * (2 * se**2) ** 0.5 < 2.0
    assert "| A: on-policy beats SFT | records, student-medium | +2.00 | 1.63 | higher |" in rows
    assert any(r.startswith("| B:") and r.endswith("no difference detected |") for r in rows)
    assert any(r.startswith("| D:") and r.endswith("no difference detected |") for r in rows)
    assert any(r.startswith("| E:") and "+15.00" in r and r.endswith("higher |") for r in rows)
    # one (task, student) of three: "partly" at most
    assert verdicts["A: on-policy beats SFT"] == "partly"
    assert verdicts["B: on-policy beats supervised KD"] == "not reproduced"


def test_one_run_through_the_grids_path_is_scored_as_an_independent_evaluation(
    tmp_path, monkeypatch
):
    """A real (shrunken) on-policy run on the variant task: its validation scores at each
    temperature and its chosen.json test scores equal `evaluate` of its final checkpoint,
    sampled at that temperature (the second, independent path through the sampler)."""
    monkeypatch.chdir(ROOT)
    shrink = [
        "optim.steps=2",
        "optim.batch_size=4",
        "optim.warmup_steps=1",
        "run.eval_every=1",
        "run.eval_size=4",
        "task.train_size=50",
        "task.validation_size=6",
        "task.test_size=6",
    ]
    declared = fair_table._extra
    monkeypatch.setattr(fair_table, "_extra", lambda task: [*declared(task), *shrink])
    monkeypatch.setattr(fair_table, "SAVE_EVERY", 1)
    monkeypatch.setattr(fair_table, "CURVE_SIZE", 4)
    method = ON_POLICY[1.0]
    out = run_dir("records-4to6", "student-medium", method.label, 3, tmp_path)
    result = fair_table.train_one("records-4to6", "student-medium", method, 3, out)
    assert result["task"] == "records-4to6" and result["steps"] == 2
    assert set(result["validation"]) == {"0", "0.3", "0.5", "0.7", "1"}
    chosen = fair_table.finish_one("records-4to6", "student-medium", method, 3, out, 0.5)
    assert [step for step, _ in chosen["validation_curve"]] == [0, 1, 2]
    from student_trainer.checkpoint import latest_checkpoint
    from student_trainer.config import load_config
    from student_trainer.evaluate import evaluate_split

    for temperature, split, scores in (
        (1.0, "validation", result["validation"]["1"]),
        (0.5, "test", chosen["test"]),
    ):
        overrides = [*method.overrides(), f"rollout.temperature={temperature}", "run.seed=3"]
        overrides += ["task.name=records-4to6", *shrink]
        config = load_config(ROOT / "configs/paper/records.yaml", overrides)
        independent = evaluate_split(config, split, checkpoint=latest_checkpoint(out))
        assert scores == {
            "faithful": independent["sampled_faithful"],
            "chrf": pytest.approx(independent["sampled_chrf"]),
        }
    greedy = evaluate_split(config, "validation", checkpoint=latest_checkpoint(out))
    assert result["validation"]["0"]["faithful"] == greedy["faithful"]


def test_the_published_json_and_results_md_are_recomputed_from_the_committed_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    found = fair_report.cells()
    published = json.loads(fair_report.RESULTS_JSON.read_text())
    assert published == json.loads(json.dumps(found))
    text = fair_report.RESULTS_MD.read_text()
    generated = text.split(fair_report.BEGIN)[1].split(fair_report.END)[0]
    for cell in found:
        table = fair_report.cell_table(cell["task"], cell["student"], found)
        assert f"### {cell['task']}, {cell['student']}\n\n{table}" in generated
    assert fair_report.selection_table(found) in generated
