"""threads.py's count: the affinity mask and the cgroup CPU quota, read from fake /proc and
/sys trees laid out as cgroup v1, v2 and containers show them, and the overrides'
precedence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from causal_lm.threads import available_cpus, cgroup_cpu_quota, choose_threads

V2_MOUNTS = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
V1_MOUNTS = (
    "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n"
    "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0\n"
    "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
    "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n"  # hybrid: no cpu controller
)
MASK = len(os.sched_getaffinity(0))


def fake_root(tmp_path: Path, mounts: str, cgroup: str, files: dict[str, str]) -> Path:
    """/proc/self/{mounts,cgroup} and the cgroup files given (path -> content) under tmp_path."""
    for path, content in {
        "proc/self/mounts": mounts,
        "proc/self/cgroup": cgroup,
        **files,
    }.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    return tmp_path


def test_v2_quota_of_the_process_cgroup(tmp_path):
    root = fake_root(
        tmp_path,
        V2_MOUNTS,
        "0::/kubepods/pod1/c1\n",
        {"sys/fs/cgroup/kubepods/pod1/c1/cpu.max": "150000 100000\n"},
    )
    assert cgroup_cpu_quota(root) == 1.5


def test_v2_the_tightest_quota_on_the_path_wins(tmp_path):
    """A pod's limit sits on the pod's cgroup, above the container's (unlimited) one."""
    root = fake_root(
        tmp_path,
        V2_MOUNTS,
        "0::/kubepods/pod1/c1\n",
        {
            "sys/fs/cgroup/cpu.max": "max 100000\n",
            "sys/fs/cgroup/kubepods/pod1/cpu.max": "200000 100000\n",
            "sys/fs/cgroup/kubepods/pod1/c1/cpu.max": "max 100000\n",
        },
    )
    assert cgroup_cpu_quota(root) == 2.0


def test_v2_in_a_cgroup_namespace_the_mount_is_the_container(tmp_path):
    """Docker on cgroup v2: /proc/self/cgroup says "0::/", the limit is at the mount."""
    root = fake_root(tmp_path, V2_MOUNTS, "0::/\n", {"sys/fs/cgroup/cpu.max": "50000 100000"})
    assert cgroup_cpu_quota(root) == 0.5


def test_v1_quota_over_period(tmp_path):
    root = fake_root(
        tmp_path,
        V1_MOUNTS,
        "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
        {
            "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
            "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            "sys/fs/cgroup/memory/docker/abc/cpu.cfs_quota_us": "50000\n",  # not the cpu tree
            "sys/fs/cgroup/memory/docker/abc/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cgroup_cpu_quota(root) == 3.0


def test_v1_container_sees_its_own_cgroup_at_the_mount(tmp_path):
    """Docker on cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host's
    path, which does not exist inside; the container's own cgroup is the mount itself."""
    root = fake_root(
        tmp_path,
        V1_MOUNTS,
        "4:cpu,cpuacct:/docker/abc\n",
        {
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "100000\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cgroup_cpu_quota(root) == 1.0


@pytest.mark.parametrize(
    "files",
    [
        {},  # no cgroup files at all
        {"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n"},  # v1 unlimited
        {
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "lots\n",  # garbled
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
        {
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "100000\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "0\n",
        },
    ],
    ids=["none", "unlimited", "garbled", "zero-period"],
)
def test_no_quota_known(tmp_path, files):
    root = fake_root(tmp_path, V1_MOUNTS, "4:cpu,cpuacct:/\n", files)
    assert cgroup_cpu_quota(root) is None


def test_no_proc_files_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path) is None


def test_the_quota_rounds_down_below_the_mask_and_never_to_zero(tmp_path):
    def cpus(quota: str) -> int:
        files = {"sys/fs/cgroup/cpu.max": f"{quota} 100000"}
        return available_cpus(fake_root(tmp_path, V2_MOUNTS, "0::/\n", files))[0]

    assert cpus("max") == MASK
    assert cpus("10000") == 1  # a tenth of a CPU still runs one thread
    assert cpus(str(100000 * (MASK + 4))) == MASK  # a quota above the mask: the mask
    if MASK >= 2:
        assert cpus("150000") == 1


def test_precedence_flag_then_teacher_threads_then_omp_then_automatic(tmp_path):
    root = fake_root(tmp_path, V2_MOUNTS, "0::/\n", {"sys/fs/cgroup/cpu.max": "100000 100000"})
    both = {"TEACHER_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert choose_threads(7, both, root).count == 7
    assert choose_threads(0, both, root).count == 3
    assert choose_threads(0, {**both, "TEACHER_THREADS": "0"}, root).count == 5
    assert choose_threads(0, {"OMP_NUM_THREADS": "5"}, root).count == 5
    automatic = choose_threads(0, {"OMP_NUM_THREADS": ""}, root)
    assert automatic.count == 1
    assert "cgroup CPU quota 1" in automatic.reason


def test_processes_split_the_automatic_count_but_not_an_explicit_one(tmp_path):
    root = fake_root(tmp_path, V2_MOUNTS, "0::/\n", {"sys/fs/cgroup/cpu.max": "400000 100000"})
    shared = choose_threads(0, {}, root, processes=2)
    assert shared.count == max(1, min(MASK, 4) // 2)
    assert "shared by 2 processes" in shared.reason
    assert choose_threads(0, {}, root, processes=MASK + 1).count == 1
    assert choose_threads(3, {}, root, processes=2).count == 3


@pytest.mark.parametrize(
    "requested, environ, message",
    [
        (-1, {}, "--threads must be >= 0"),
        (0, {"TEACHER_THREADS": "many"}, "TEACHER_THREADS must be a whole number"),
        (0, {"OMP_NUM_THREADS": "-2"}, "OMP_NUM_THREADS must be >= 0"),
    ],
)
def test_bad_counts_are_refused_naming_their_source(requested, environ, message):
    with pytest.raises(ValueError, match=message):
        choose_threads(requested, environ)
