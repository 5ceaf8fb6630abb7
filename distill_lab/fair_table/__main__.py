"""`python -m distill_lab.fair_table` (`make fair-table`): run the grid, then the report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context

from tqdm import tqdm

from distill_lab import fair_table
from distill_lab.fair_table import STUDENTS, Job, execute, planned_jobs, reference
from distill_lab.paper_table import init_worker

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
        running: dict[Future, Job] = {}
        attempted: set[Job] = set()
        bar = tqdm(total=0, desc="fair table", unit="job")
        while True:
            for job in planned_jobs():
                wanted = not only or job.cell in only
                if job not in attempted and wanted and not job.done():
                    attempted.add(job)
                    running[pool.submit(execute, job)] = job
                    bar.total += 1
                    bar.refresh()
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job, result = running.pop(future), future.result()
                bar.update(1)
                shown = result.get("test", {})
                bar.write(
                    f"{job.describe()}: {json.dumps({k: round(v, 2) for k, v in shown.items()})}"
                )
        bar.close()
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
