"""Threads from the cores a process may really use: CPU affinity and cgroup quotas (v1 and v2)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from melfusion.cpus import available_cpus


def cgroup_tree(tmp_path, proc_line: str, files: dict[str, str]):
    (tmp_path / "proc").write_text(proc_line + "\n")
    for name, text in files.items():
        path = tmp_path / "cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {"proc_cgroup": tmp_path / "proc", "cgroup_root": tmp_path / "cgroup"}


@pytest.mark.parametrize(
    ("proc_line", "files", "quota"),
    [
        ("0::/kubepods/pod1/ctr", {"kubepods/pod1/ctr/cpu.max": "max 100000",
                                    "kubepods/pod1/cpu.max": "150000 100000"}, 1),  # a parent's quota
        ("0::/", {"cpu.max": "100000 100000"}, 1),  # a container sees its own cgroup at the root
        ("0::/", {"cpu.max": "50000 100000"}, 1),  # half a core still gets a thread
        ("4:cpu,cpuacct:/docker/abc", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000",
                                       "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}, 1),
        ("1:cpu:/", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),  # v1, no quota
        ("0::/", {"cpu.max": "max 100000"}, None),
    ],
)
def test_a_cgroup_quota_caps_the_cores(tmp_path, proc_line, files, quota):
    cores = len(os.sched_getaffinity(0))
    assert available_cpus(**cgroup_tree(tmp_path, proc_line, files)) == min(cores, quota or cores)


def test_cpu_affinity_caps_the_cores():
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " \
           "from melfusion.cpus import available_cpus; print(available_cpus())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "1\n"
