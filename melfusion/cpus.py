"""How many CPU threads torch should use: the cores this process may really run on.

torch's default is the machine's core count. In a container held to a CPU quota (cgroup `cpu.max`) or
pinned to some cores (cpuset, `taskset`) that oversubscribes. And OpenMP's waiting threads spin by
default, so on cores other processes also use, each parallel region waits for a descheduled thread while
the others burn the time slices: measured on 2 shared, busy cores, a tiny-bundle generation took 134 s with
2 spinning threads, 22 s with 2 sleeping ones, 22–26 s with one thread. Torch-free until
`set_torch_threads` is called.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(*, proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: its CPU affinity, capped by the tightest CPU quota of its cgroup and the
    cgroups above it (v2 `cpu.max`, v1 `cpu.cfs_quota_us`); at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quotas = [_quota(folder) for folder in _cgroup_folders(proc_cgroup, cgroup_root)]
    limits = [math.floor(quota) for quota in quotas if quota is not None]
    return max(1, min([cores, *limits]))


def let_idle_threads_sleep() -> None:
    """OpenMP threads that wait for work sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE, unless the
    environment says otherwise). OpenMP reads it when torch loads it: call before torch is imported (child
    processes inherit it)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_torch_threads(threads: int | None = None) -> int:
    """Give torch `threads` intra-op threads; by default OMP_NUM_THREADS if set, else the available cores
    (one computing process per container or machine; N workers sharing cores each take cores / N, set by
    the caller). Returns the number set."""
    import torch

    if threads is None:
        omp = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(omp) if omp.isdigit() and int(omp) > 0 else available_cpus()
    torch.set_num_threads(threads)
    return threads


def _cgroup_folders(proc_cgroup: Path, cgroup_root: Path) -> list[Path]:
    """This process's CPU cgroup folders and their ancestors, for cgroup v2 and v1 mounts."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    folders = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified tree
            mounts = [cgroup_root]
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own tree
            mounts = [cgroup_root / name for name in (controllers, "cpu", "cpu,cpuacct")]
        else:
            continue
        for mount in dict.fromkeys(mounts):
            folder = mount / path.lstrip("/")
            while True:  # a container sees its own cgroup at the mount's root; a host sees the full path
                folders.append(folder)
                if folder == mount:
                    break
                folder = folder.parent
    return folders


def _quota(folder: Path) -> float | None:
    """The CPUs a cgroup folder allows, or None without a quota (or without the files)."""
    try:
        if (folder / "cpu.max").is_file():
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (folder / "cpu.cfs_quota_us").is_file():
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None
