"""Staleness 1 against 0 on translation: the comparison docs/RESULTS.md declares.

    .venv/bin/python scripts/staleness_runs.py           # 6 runs, 2 at a time (~5 min, 2 cores)

Each run is the paper table's on-policy JSD(0.9) translation cell (student_trainer/
paper_table: the same config, budget and test evaluation) with `rollout.max_staleness`
set; results land in results/staleness-runs/k-K/seed-N/result.json (committed; a run whose file
exists is not run again; checkpoints and logs beside it are not committed) and the table
is printed at the end.
"""

from __future__ import annotations

import statistics
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from distill_lab.paper_table import SEEDS, Method, init_worker, read_result, run_one

STALENESS = (0, 1)
METHOD = Method("on_policy_gkd", 0.9, 1.0)
OUT = Path("results/staleness-runs")
DECODINGS = {"greedy": "metric", "sampled": "sampled_metric"}


def run(staleness: int, seed: int) -> dict:
    out = OUT / f"k-{staleness}" / f"seed-{seed}"
    done = read_result(out)
    if done is not None:
        return done
    extra = [f"rollout.max_staleness={staleness}"]
    return run_one("translation", "student", METHOD, seed, out, lr=3e-4, extra=extra)


def main() -> None:
    cells = [(k, seed) for k in STALENESS for seed in SEEDS]
    with ProcessPoolExecutor(
        2, mp_context=get_context("spawn"), initializer=init_worker, initargs=(1,)
    ) as pool:
        results = dict(zip(cells, pool.map(run, *zip(*cells))))
    print(f"translation, on-policy JSD(0.9), test exact match %, seeds {SEEDS}")
    print(f"{'staleness':>9}  {'decoding':8}  {'per seed':>20}  {'mean':>6}  {'std':>5}  wall s")
    arms: dict[tuple[int, str], list[float]] = {}
    for k in STALENESS:
        for decoding, key in DECODINGS.items():
            values = [results[k, seed]["test"][key] for seed in SEEDS]
            arms[k, decoding] = values
            wall = statistics.mean(results[k, seed]["wall_s"] for seed in SEEDS)
            shown = " ".join(f"{v:6.1f}" for v in values)
            print(
                f"{k:>9}  {decoding:8}  {shown:>20}  {statistics.mean(values):6.2f}  "
                f"{statistics.stdev(values):5.2f}  {wall:5.0f}"
            )
    for decoding in DECODINGS:
        gap = statistics.mean(arms[1, decoding]) - statistics.mean(arms[0, decoding])
        std = statistics.stdev(arms[0, decoding])
        verdict = "within" if abs(gap) <= std else "beyond"
        print(f"{decoding}: mean(1) - mean(0) = {gap:+.2f}, {verdict} 1 std of k=0 ({std:.2f})")


if __name__ == "__main__":
    main()
