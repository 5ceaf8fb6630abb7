"""`python -m distill_lab.paper_table` (`make paper-table`): run the grid, then the report.

The entry point lives apart from the grid (distill_lab/paper_table/__init__.py) because
the report imports the grid: the grid must not import the report back.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from distill_lab import paper_table
from distill_lab.paper_table import TABLE_TASKS, init_worker, run_grid
from distill_lab.paper_table.report import write_report

MODULE = "python -m distill_lab.paper_table"


def build_parser() -> argparse.ArgumentParser:
    """The grid's options (`make paper-table` runs it with --jobs 2)."""
    parser = argparse.ArgumentParser(
        prog=MODULE,
        description=paper_table.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--task", action="append", choices=TABLE_TASKS, help="the tasks to run; None: all"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TASK/LABEL",
        help="run only these cells (at every student of the task), e.g. records/sft "
        "(repeatable); the report uses all",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, help="torch threads per run; None: cores / jobs")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the report from the runs' results"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    init_worker(threads)  # the parent scores the references
    if not args.report_only:
        run_grid(args.task or list(TABLE_TASKS), set(args.only), args.jobs, threads)
    elapsed = None if args.report_only else time.perf_counter() - started
    write_report(" ".join([MODULE, *argv]), elapsed)  # as run: a command that works


if __name__ == "__main__":
    main()
