"""The demo's wall time on a loaded machine: torch's default threads against the split.

Before this change the demo's teacher and trainer each ran torch's default thread count,
every CPU of the affinity mask; now each gets half of the CPUs (student_trainer/demo.py,
teacher_service/threads.py). Both are run here, alternating, while `--busy` spin loops
(one Python `while True: pass` each) hold CPUs the way other work on a shared machine
does. "before" is `--threads <the mask's CPUs>`, which is what torch chose by itself.
The demo is shortened to `--steps` training steps per run (the full demo trains 150); its
evaluations (200 prompts, three times) are kept.

    python bench/bench_threads.py --steps 10 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPIN = "while True: pass"


def run_demo(steps: int, threads: int, log: Path) -> tuple[float, str]:
    """One demo's wall time, and its line saying the threads it gave each process."""
    command = [sys.executable, "-m", "student_trainer.demo", "--steps", str(steps)]
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(
            [*command, "--threads", str(threads)], stdout=out, stderr=subprocess.STDOUT
        )
    seconds = time.perf_counter() - started
    text = log.read_text()
    if done.returncode != 0:
        raise SystemExit(f"the demo failed ({done.returncode}); its output: {log}")
    (threads_line,) = re.findall(r"^==> threads: (.*)$", text, flags=re.MULTILINE)
    return seconds, threads_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10, help="training steps per demo run")
    parser.add_argument("--rounds", type=int, default=1, help="before/after pairs to run")
    parser.add_argument("--busy", type=int, default=2, help="spin loops loading the machine")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    runs = {"before (torch default)": cpus, "after (split)": 0}
    logs = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    print(
        f"{cpus} CPUs, {args.busy} spin loops, demo --steps {args.steps}, "
        f"load average before start {os.getloadavg()[0]:.1f}; logs in {logs}",
        flush=True,
    )
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.busy)]
    times: dict[str, list[float]] = {label: [] for label in runs}
    try:
        for round_ in range(args.rounds):
            for label, threads in runs.items():
                log = logs / f"{label.split()[0]}-{round_}.log"
                seconds, chosen = run_demo(args.steps, threads, log)
                times[label].append(seconds)
                print(f"round {round_ + 1} {label:24s} {seconds:7.1f} s  threads: {chosen}")
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    print("\n| run | wall time (s), each round | mean (s) |\n|---|---|---|")
    for label, values in times.items():
        each = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {label} | {each} | {sum(values) / len(values):.0f} |")


if __name__ == "__main__":
    main()
