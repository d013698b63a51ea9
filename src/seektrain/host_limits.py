"""What this process may use of the host: CPUs and memory, including the limits of its cgroup.

A container's `--cpus` and `--memory`, a Kubernetes pod's limits or a batch job's allocation are cgroup
limits, which neither `os.sched_getaffinity` nor /proc/meminfo shows: a 2-CPU container on a 64-core host
sees 64 CPUs (64 torch threads and 64 prepare workers fighting over 2 CPUs' worth of time), and a
host's free memory where its own limit is far lower (a model that cannot fit is OOM-killed without a
word instead of refused). Both cgroup versions are read (v2, and v1 as older Docker and Slurm set up),
along the process's own cgroup path and its ancestors, where a limit set higher up applies too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_V1_NO_LIMIT = 1 << 62  # v1 reports "no memory limit" as a page-rounded 2**63 - 1


def usable_cpus(root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> int:
    """The CPUs this process may keep busy: those of its affinity (taskset, a cpuset), at most its cgroup's
    CPU quota rounded up (a quota of 1.5 CPUs still runs 2 threads at a time)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(root, proc)
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def fit_torch_threads(root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> int:
    """torch's intra-op threads, at most `usable_cpus()` unless OMP_NUM_THREADS sets them (torchrun sets 1
    per rank): torch starts one per CPU of the affinity, and threads beyond a cgroup's quota wait at
    every op's barrier for CPU time the quota does not give. Returns the threads torch now runs."""
    import torch  # here: data preparation's workers import this module without torch

    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > (cpus := usable_cpus(root, proc)):
        torch.set_num_threads(cpus)
    return torch.get_num_threads()


def cpu_quota(root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> float | None:
    """CPUs' worth of time per period the cgroup allows (quota / period, the smallest along the path),
    or None without a quota ("max" in v2, -1 in v1)."""
    dirs, v2 = _limit_dirs(root, proc, "cpu")
    v1_files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
    pairs = [_read(d / "cpu.max").split() if v2 else [_read(d / f) for f in v1_files] for d in dirs]
    quotas = [q for pair in pairs if len(pair) == 2 and (q := _ratio(*pair)) is not None]
    return min(quotas) if quotas else None


# per cgroup version (v2?): the limit file, the usage file, and the inactive page cache's key in memory.stat
_MEMORY_FILES = {
    True: ("memory.max", "memory.current", "inactive_file"),
    False: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}


def memory_headroom(root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> int | None:
    """Bytes the process may still allocate under its cgroup's memory limit (the least along the path):
    the limit minus what the cgroup uses, less its inactive page cache, which the kernel reclaims first
    (the working set Kubernetes and Docker compare with the limit); None without a limit."""
    dirs, v2 = _limit_dirs(root, proc, "memory")
    limit_file, usage_file, inactive_key = _MEMORY_FILES[v2]
    room = []
    for d in dirs:
        limit, usage = _read(d / limit_file), _read(d / usage_file)  # v2 "max", v1 ~2**63: no limit
        if limit.isdigit() and usage.isdigit() and int(limit) < _V1_NO_LIMIT:
            room.append(int(limit) - int(usage) + _stat(d / "memory.stat").get(inactive_key, 0))
    return max(0, min(room)) if room else None


def available_host_memory(root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> int | None:
    """What can be allocated without swapping or being killed: MemAvailable of /proc/meminfo, at most the
    cgroup's headroom; None where neither is known."""
    figures = [m for m in (_mem_available(), memory_headroom(root, proc)) if m is not None]
    return min(figures) if figures else None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _own_paths(proc: Path) -> dict[str, str]:
    """The process's cgroup path per v1 controller, and under "" its v2 (unified) path."""
    paths = {}
    for line in _read(proc).splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _limit_dirs(root: Path, proc: Path, controller: str) -> tuple[list[Path], bool]:
    """The folders whose limits of `controller` apply to this process, and whether they are cgroup v2
    (a v2 hierarchy at the root; else v1, with a mount per controller: "cpu" may link to "cpu,cpuacct")."""
    paths = _own_paths(proc)
    if "" in paths and (root / "cgroup.controllers").is_file():
        return _up_to(root, paths[""]), True
    base = root / controller
    return ([] if controller not in paths or not base.is_dir() else _up_to(base, paths[controller])), False


def _up_to(base: Path, path: str) -> list[Path]:
    """The cgroup's folder and its ancestors up to `base`; just `base` where the path is not visible below
    it (a container that mounts its own cgroup as the root, without a cgroup namespace)."""
    leaf = base / path.strip("/")
    if not leaf.is_dir():
        return [base]
    dirs = [leaf]
    while dirs[-1] != base and base in dirs[-1].parents:
        dirs.append(dirs[-1].parent)
    return dirs


def _stat(path: Path) -> dict[str, int]:
    out = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _ratio(quota: str, period: str) -> float | None:
    """quota / period where both are positive integers ("max" and "-1" mean no quota)."""
    numbers = quota.isdigit() and period.isdigit() and int(quota) > 0 and int(period) > 0
    return int(quota) / int(period) if numbers else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""
