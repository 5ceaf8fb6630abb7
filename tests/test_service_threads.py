"""The real `teacher-service serve` process sizes torch's pools to the CPUs it may use: on
one CPU of the affinity mask (`taskset`), and in a cgroup whose quota is one CPU while
the mask holds two (a pod's CPU limit: torch by itself would see both).

The count is read from the running process: its threads in /proc/<pid>/task that carry
the process's own name. Those are the ones Python, torch and the tokenizers start; gRPC
names its own (event_engine, ...) and starts them as load comes, so they are left out.
Each case is compared with `--threads 1` and `--threads 2` under the same placement: the
automatic count must match one thread, and two threads must show as more."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from teacher_service.cli import free_port

QUOTA = "100000 100000"  # one CPU: 100 ms of CPU time per 100 ms period
CGROUP_NAME = f"teacher-threads-test-{os.getpid()}"


@dataclass
class Served:
    threads: int  # the process's threads not named by gRPC, once it serves
    chosen: int  # the count its start-up line names
    reason: str


def serve_and_count(model_dir: Path, cpus: str, *flags: str, cgroup: Path | None = None):
    """Start the service pinned to `cpus` (and inside `cgroup`), count its threads once it
    listens (warm-up has run forwards by then: every pool torch starts is up), stop it."""
    command = ["taskset", "-c", cpus, sys.executable, "-m", "teacher_service",
               "--log-level", "INFO", "serve", "--model", str(model_dir),
               "--port", str(free_port()), "--device", "cpu", *flags]  # fmt: skip
    if cgroup is not None:  # the shell joins the cgroup, then becomes the service
        command = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("teacher-service listening on"):
                break
        output = "".join(lines)
        assert process.poll() is None, f"the service exited:\n{output}"
        name = Path(f"/proc/{process.pid}/comm").read_text()
        tasks = Path(f"/proc/{process.pid}/task").iterdir()
        threads = sum((task / "comm").read_text() == name for task in tasks)
    finally:
        process.terminate()
        process.wait()
    logged = re.search(r"threads: (\d+) \(torch[^)]*\): (.*)", output)
    assert logged, f"no start-up line names the threads:\n{output}"
    return Served(threads, int(logged[1]), logged[2])


@pytest.fixture
def quota_cgroup() -> Iterator[Path]:
    """A new cgroup allowing one CPU: cgroup v2's cpu.max where v2 holds the cpu
    controller, else v1's cpu.cfs_quota_us. Skipped, saying why, where neither is allowed."""
    reasons = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, kind, options, *_ = line.split()
        if kind == "cgroup2":
            controllers = Path(point, "cgroup.controllers")
            if "cpu" not in controllers.read_text().split():
                reasons.append(f"{point}: cgroup v2 without the cpu controller")
                continue
            files = {"../cgroup.subtree_control": "+cpu", "cpu.max": QUOTA}
        elif kind == "cgroup" and "cpu" in options.split(","):
            files = {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"}
        else:
            continue
        directory = Path(point, CGROUP_NAME)
        try:
            directory.mkdir()
            for name, value in files.items():
                (directory / name).write_text(value)
        except OSError as error:
            reasons.append(f"{directory}: {error}")
            if directory.is_dir():
                directory.rmdir()
            continue
        yield directory
        directory.rmdir()  # its processes have exited: the cgroup is empty
        return
    pytest.skip(f"no cgroup with a CPU quota can be made here ({'; '.join(reasons)})")


def test_one_cpu_in_the_affinity_mask_runs_one_torch_thread(tiny_model_dir):
    cpu = str(min(os.sched_getaffinity(0)))
    automatic = serve_and_count(tiny_model_dir, cpu)
    one = serve_and_count(tiny_model_dir, cpu, "--threads", "1")
    two = serve_and_count(tiny_model_dir, cpu, "--threads", "2")
    assert automatic.chosen == 1
    assert "affinity mask" in automatic.reason
    assert automatic.threads == one.threads < two.threads


def test_a_cgroup_quota_of_one_cpu_runs_one_torch_thread(tiny_model_dir, quota_cgroup):
    mask = sorted(os.sched_getaffinity(0))
    if len(mask) < 2:
        pytest.skip("needs two CPUs in the affinity mask, for a quota below it")
    cpus = f"{mask[0]},{mask[1]}"
    automatic = serve_and_count(tiny_model_dir, cpus, cgroup=quota_cgroup)
    one = serve_and_count(tiny_model_dir, cpus, "--threads", "1", cgroup=quota_cgroup)
    two = serve_and_count(tiny_model_dir, cpus, "--threads", "2", cgroup=quota_cgroup)
    assert automatic.chosen == 1
    assert automatic.reason == "cgroup CPU quota 1 CPU (affinity mask: 2 CPUs)"
    assert automatic.threads == one.threads < two.threads
