"""`python -m distill_lab.fair_table` (`make fair-table`): run the grid, then the report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from distill_lab import fair_table
from distill_lab.fair_table import STUDENTS, execute, planned_jobs, reference
from distill_lab.paper_table import init_worker, keep_busy

MODULE = "python -m distill_lab.fair_table"


def run_grid(jobs: int, threads: int, only: set[str]) -> None:
    """Keep `jobs` processes busy with every pending job; whenever one finishes, plan
    again, since it may complete a cell (its temperature) or the divergence choice."""
    context = get_context("spawn")
    with ProcessPoolExecutor(jobs, context, initializer=init_worker, initargs=(threads,)) as pool:
        references = [
            pool.submit(reference, task, role)
            for task, students in STUDENTS.items()
            for role in ("teacher", *students)
        ]
        keep_busy(
            pool,
            planned_jobs,
            execute,
            pending=lambda job: not job.done(),
            only=only,
            summary=lambda result: json.dumps(
                {k: round(v, 2) for k, v in result.get("test", {}).items()}
            ),
            desc="fair table",
        )
        for future in references:
            future.result()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog=MODULE,
        description=fair_table.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--jobs", type=int, default=2, help="jobs in parallel (processes)")
    parser.add_argument("--threads", type=int, help="torch threads per job; None: cores / jobs")
    parser.add_argument(
        "--only", action="append", default=[], metavar="TASK/LABEL",
        help="run only these cells, e.g. records/sft (repeatable); the report uses all",
    )  # fmt: skip
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the report from the results"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    init_worker(threads)
    if not args.report_only:
        run_grid(args.jobs, threads, set(args.only))
    elapsed = None if args.report_only else time.perf_counter() - started
    from distill_lab.fair_table.report import write_report  # the report imports the grid

    write_report(" ".join([MODULE, *argv]), elapsed)


if __name__ == "__main__":
    main()
