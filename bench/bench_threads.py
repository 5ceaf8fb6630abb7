"""The demo's wall time on a loaded machine: torch's default threads against the split.

Before this change the demo's teacher and trainer each ran torch's default thread count,
every CPU of the affinity mask; now each gets half of the CPUs (distill_lab/demo.py,
causal_lm/threads.py). Both are run here, alternating, while `--busy` spin loops
(one Python `while True: pass` each) hold CPUs the way other work on a shared machine
does. "before" is `--threads <the mask's CPUs>`, which is what torch chose by itself.
The demo is shortened to `--steps` training steps per run (the full demo trains 150); its
evaluations (200 prompts, three times) are kept. A run still going after `--timeout`
seconds is stopped (its teacher too) and reported as "> timeout".

    python bench/bench_threads.py --steps 5 --rounds 1 --timeout 480
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPIN = "while True: pass"


def run_demo(steps: int, threads: int, log: Path, timeout: float) -> tuple[float | None, str]:
    """One demo's wall time (None: stopped at `timeout`), and its line saying the threads
    it gave each process."""
    command = [sys.executable, "-m", "distill_lab.demo", "--steps", str(steps)]
    started = time.perf_counter()
    with log.open("w") as out:  # a session of its own: a stop takes its teacher along
        demo = subprocess.Popen(
            [*command, "--threads", str(threads)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = demo.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
            code = None
    seconds = time.perf_counter() - started
    text = log.read_text()
    if code not in (0, None):
        raise SystemExit(f"the demo failed ({code}); its output: {log}")
    (threads_line,) = re.findall(r"^==> threads: (.*)$", text, flags=re.MULTILINE)
    return (seconds if code == 0 else None), threads_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10, help="training steps per demo run")
    parser.add_argument("--rounds", type=int, default=1, help="before/after pairs to run")
    parser.add_argument("--busy", type=int, default=2, help="spin loops loading the machine")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a run may take")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    runs = {"after (split)": 0, "before (torch default)": cpus}
    logs = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    print(
        f"{cpus} CPUs, {args.busy} spin loops, demo --steps {args.steps}, "
        f"load average before start {os.getloadavg()[0]:.1f}; logs in {logs}",
        flush=True,
    )
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.busy)]
    times: dict[str, list[float | None]] = {label: [] for label in runs}
    try:
        for round_ in range(args.rounds):
            for label, threads in runs.items():
                log = logs / f"{label.split()[0]}-{round_}.log"
                seconds, chosen = run_demo(args.steps, threads, log, args.timeout)
                times[label].append(seconds)
                took = f"> {args.timeout:.0f}" if seconds is None else f"{seconds:.1f}"
                print(f"round {round_ + 1} {label:24s} {took:>7s} s  threads: {chosen}", flush=True)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    print("\n| run | wall time (s), each round |\n|---|---|")
    for label, values in times.items():
        each = ", ".join(f"> {args.timeout:.0f}" if v is None else f"{v:.0f}" for v in values)
        print(f"| {label} | {each} |")


if __name__ == "__main__":
    main()
