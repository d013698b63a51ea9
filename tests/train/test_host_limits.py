"""CPU and memory limits read from cgroup folders laid out on disk as the kernel lays them out (v2, and v1
as Docker without a cgroup namespace mounts it), and torch's thread count fitted to them."""

import os

import pytest
import torch

from seektrain import host_limits as H

MiB = 1 << 20


def write(root, files: dict[str, str]):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def affinity() -> int:
    return len(os.sched_getaffinity(0))


@pytest.fixture
def v2(tmp_path):
    """A pod's container three levels down a v2 hierarchy; the pod's folder holds the limits."""
    root = tmp_path / "cgroup"
    write(
        root,
        {
            "cgroup.controllers": "cpuset cpu io memory pids",
            "kubepods/cpu.max": "max 100000",
            "kubepods/pod1/cpu.max": "150000 100000",
            "kubepods/pod1/memory.max": str(1024 * MiB),
            "kubepods/pod1/memory.current": str(600 * MiB),
            "kubepods/pod1/memory.stat": f"anon {400 * MiB}\nfile {200 * MiB}\ninactive_file {150 * MiB}",
            "kubepods/pod1/ctr/cpu.max": "max 100000",
            "kubepods/pod1/ctr/memory.max": "max",
            "kubepods/pod1/ctr/memory.current": str(590 * MiB),
        },
    )
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    return root, proc


def test_v2_limits_set_above_the_process_cgroup_apply(v2):
    root, proc = v2
    assert H.cpu_quota(root, proc) == 1.5
    assert H.usable_cpus(root, proc) == min(affinity(), 2)  # 1.5 CPUs of time: 2 threads can use it
    # 1024 - 600 used + 150 of inactive page cache, which the kernel reclaims first
    assert H.memory_headroom(root, proc) == 574 * MiB
    assert H.available_host_memory(root, proc) == 574 * MiB  # far below this machine's MemAvailable


def test_v1_as_docker_mounts_it_without_a_cgroup_namespace(tmp_path):
    """/proc/self/cgroup names /docker/ID, but the container sees its own cgroup at the mount's root."""
    root = tmp_path / "cgroup"
    write(
        root,
        {
            "cpu/cpu.cfs_quota_us": "50000",
            "cpu/cpu.cfs_period_us": "100000",
            "memory/memory.limit_in_bytes": str(2048 * MiB),
            "memory/memory.usage_in_bytes": str(1024 * MiB),
            "memory/memory.stat": f"total_cache {300 * MiB}\ntotal_inactive_file {200 * MiB}",
        },
    )
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/docker/abc\n")
    assert H.cpu_quota(root, proc) == 0.5 and H.usable_cpus(root, proc) == 1
    assert H.memory_headroom(root, proc) == (2048 - 1024 + 200) * MiB


def test_v1_unlimited_reads_as_no_limit(tmp_path):
    root = tmp_path / "cgroup"
    write(
        root,
        {
            "cpu/job/cpu.cfs_quota_us": "-1",
            "cpu/job/cpu.cfs_period_us": "100000",
            "memory/job/memory.limit_in_bytes": "9223372036854771712",
            "memory/job/memory.usage_in_bytes": str(MiB),
        },
    )
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:memory:/job\n1:cpu:/job\n")
    assert H.cpu_quota(root, proc) is None and H.memory_headroom(root, proc) is None
    assert H.usable_cpus(root, proc) == affinity()


def test_no_cgroup_at_all_means_no_limits(tmp_path):
    root, proc = tmp_path / "none", tmp_path / "no_proc_file"
    assert H.cpu_quota(root, proc) is None and H.memory_headroom(root, proc) is None
    assert H.usable_cpus(root, proc) == affinity()
    assert H.available_host_memory(root, proc) > 0  # MemAvailable alone


@pytest.mark.skipif(affinity() < 2, reason="needs 2 CPUs to see torch's threads cut to 1")
def test_torch_threads_fit_the_quota_unless_omp_num_threads_is_set(tmp_path, monkeypatch):
    root = tmp_path / "cgroup"
    write(root, {"cgroup.controllers": "cpu", "cpu.max": "100000 100000"})  # one CPU's worth
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/\n")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice (torchrun sets 1) stands
        assert H.fit_torch_threads(root, proc) == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert H.fit_torch_threads(root, proc) == 1
    finally:
        torch.set_num_threads(before)
