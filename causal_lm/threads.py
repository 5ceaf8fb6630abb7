"""How many threads torch and the tokenizers get: the CPUs this process may really use.

torch sizes its pools from the cores it sees, which is every core of the machine: not the
affinity mask `taskset` or a cpuset gives, not the CPU quota of a container or a pod's
limit. Threads that outnumber their CPUs wait for one another at every parallel region's
barrier, and two processes on one machine (the demo's teacher and trainer) each take all
of it: on a loaded 2-core machine one SFT run took 1,107 s with torch's default threads
and 122 s with one (docs/benchmarks.md). So the service, the trainer and the evaluation
call `configure_threads` first thing, and the count is, by precedence:

1. `--threads N` (N >= 1) on the command line;
2. TEACHER_THREADS=N in the environment (0 or empty: not set);
3. OMP_NUM_THREADS=N, when the user (or torchrun, 1 per process) set it;
4. automatic: the CPUs of the affinity mask, capped by the cgroup CPU quota rounded
   down (a quota of 1.5 CPUs gets 1 thread: a second one would spend each period
   throttled while the first waits for it at a barrier), at least 1; divided among
   `processes` that share them (the demo's two).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

THREADS_ENV = "TEACHER_THREADS"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadChoice:
    count: int
    reason: str  # where the count came from, for the start-up log line


def configure_threads(requested: int = 0, processes: int = 1) -> ThreadChoice:
    """Size torch's intra-op and inter-op pools and the tokenizers' pool, and log why.
    Call it before any parallel work: torch fixes its inter-op pool at the first use, and
    Rayon (the tokenizers) its pool at the first parallel encode."""
    import torch

    choice = choose_threads(requested, processes=processes)
    torch.set_num_threads(choice.count)
    if torch.get_num_interop_threads() != choice.count:
        try:
            torch.set_num_interop_threads(choice.count)
        except RuntimeError:  # started already (a second call in one process): keep it
            log.warning("torch's inter-op pool was started: it keeps its threads")
    # HF tokenizers parallelise with Rayon's global pool (RAYON_NUM_THREADS) unless
    # TOKENIZERS_PARALLELISM is off; a user's own settings of either stay
    os.environ.setdefault("RAYON_NUM_THREADS", str(choice.count))
    if choice.count == 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log.info(
        "threads: %d (torch intra-op and inter-op, tokenizers): %s", choice.count, choice.reason
    )
    return choice


def choose_threads(
    requested: int = 0,
    environ: Mapping[str, str] = os.environ,
    root: Path = Path("/"),
    processes: int = 1,
) -> ThreadChoice:
    """The thread count by the module's precedence; `root` prefixes /proc and /sys (tests)."""
    if requested < 0:
        raise ValueError(f"--threads must be >= 0 (0: automatic), got {requested}")
    if requested:
        return ThreadChoice(requested, f"--threads {requested}")
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        if count := _env_count(environ, name):
            return ThreadChoice(count, f"{name}={count}")
    cpus, why = available_cpus(root)
    if processes > 1:
        return ThreadChoice(max(1, cpus // processes), f"{why}, shared by {processes} processes")
    return ThreadChoice(cpus, why)


def available_cpus(root: Path = Path("/")) -> tuple[int, str]:
    """The CPUs this process may use, at least 1, and a phrase saying what limited them."""
    mask = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mask = mask or 1
    quota = cgroup_cpu_quota(root)
    if quota is None or quota >= mask:
        limit = "no cgroup CPU quota" if quota is None else f"cgroup CPU quota {_cpus(quota)}"
        return mask, f"{_cpus(mask)} in the affinity mask, {limit}"
    cpus = max(1, math.floor(quota))
    return cpus, f"cgroup CPU quota {_cpus(quota)} (affinity mask: {_cpus(mask)})"


def cgroup_cpu_quota(root: Path = Path("/")) -> float | None:
    """CPUs per period the process's cgroups allow: the tightest quota on the path from
    its own cgroup up to the hierarchy's mount (a container may see only its own part of
    the path), cgroup v2 or v1; None when nothing limits it or nothing is readable."""
    quotas = [
        quota
        for directory in _cgroup_cpu_dirs(root)
        if (quota := _read_quota(directory)) is not None
    ]
    return min(quotas, default=None)


def _cpus(count: float) -> str:
    return f"{count:g} CPU{'' if count == 1 else 's'}"


def _env_count(environ: Mapping[str, str], name: str) -> int:
    """A thread count from the environment; 0 when unset or empty."""
    value = environ.get(name, "").strip()
    if not value:
        return 0
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number of threads, got {value!r}") from None
    if count < 0:
        raise ValueError(f"{name} must be >= 0 (0: automatic), got {count}")
    return count


def _cgroup_cpu_dirs(root: Path) -> list[Path]:
    """Every directory from the process's CPU cgroups up to their hierarchies' mounts."""
    try:
        memberships = (root / "proc/self/cgroup").read_text().splitlines()
        mounts = (root / "proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    v2, v1 = [], []
    for line in mounts:
        _, mount_point, kind, options, *_ = line.split()
        if kind == "cgroup2":
            v2.append(mount_point)
        elif kind == "cgroup" and "cpu" in options.split(","):
            v1.append(mount_point)
    directories = []
    for line in memberships:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            points = v2
        elif "cpu" in controllers.split(","):
            points = v1
        else:
            continue
        for point in points:
            mount = root / point.lstrip("/")
            directory = mount / path.lstrip("/")
            directories += [directory, *[p for p in directory.parents if p.is_relative_to(mount)]]
    return directories


def _read_quota(directory: Path) -> float | None:
    """One cgroup's CPU quota in CPUs: v2's cpu.max ("max 100000" or "150000 100000"), or
    v1's cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us; None when it sets none."""
    try:
        if (directory / "cpu.max").is_file():
            quota, period = (directory / "cpu.max").read_text().split()
        else:
            quota = (directory / "cpu.cfs_quota_us").read_text().strip()
            period = (directory / "cpu.cfs_period_us").read_text().strip()
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):  # unreadable or garbled: no limit known
        return None
