"""Fake /proc and /sys/fs/cgroup trees for layouts this machine does not have.

Each builder writes a tree under a temporary root and returns (rootfs, procfs).
The file contents are what those kernels print (cgroup v2 with systemd and
Kubernetes, hybrid v1+v2, a container with its own cgroup namespace).
"""

from __future__ import annotations

import os
from pathlib import Path

MiB = 1 << 20
V1_UNLIMITED = "9223372036854771712"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_cgroup(directory: Path, *, current: int, max_: str = "max", inactive_file: int = 0,
              oom_kill: int = 0) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write(directory / "memory.current", f"{current}\n")
    write(directory / "memory.max", f"{max_}\n")
    write(directory / "memory.stat", f"anon {current - inactive_file}\nfile {inactive_file}\n"
          f"active_file 0\ninactive_file {inactive_file}\n")
    write(directory / "memory.events", f"low 0\nhigh 0\nmax 3\noom 1\noom_kill {oom_kill}\noom_group_kill 0\n")
    write(directory / "cgroup.controllers", "cpuset cpu io memory pids\n")


MOUNTINFO_V2 = (
    "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "25 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
)


def build_v2_host(root: Path) -> tuple[str, str]:
    """A Kubernetes node, cgroup v2, seen from the host: the pod sets the limit."""
    sysfs = root / "sys/fs/cgroup"
    write(sysfs / "cgroup.controllers", "cpuset cpu io memory pids\n")
    write(sysfs / "memory.stat", "anon 1\n")  # the v2 root has no memory.current / memory.max
    pod = sysfs / "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice"
    v2_cgroup(sysfs / "kubepods.slice", current=900 * MiB, max_=str(8192 * MiB))
    v2_cgroup(sysfs / "kubepods.slice/kubepods-burstable.slice", current=600 * MiB)
    v2_cgroup(pod, current=300 * MiB, max_=str(512 * MiB), inactive_file=40 * MiB)
    ctr = pod / "cri-containerd-abc.scope"
    v2_cgroup(ctr, current=200 * MiB, inactive_file=30 * MiB, oom_kill=2)
    write(root / "proc/self/cgroup", "0::/kubepods.slice/kubepods-burstable.slice/"
          "kubepods-burstable-pod1234.slice/cri-containerd-abc.scope\n")
    write(root / "proc/self/mountinfo", MOUNTINFO_V2)
    return str(root), str(root / "proc")


def build_v2_container(root: Path) -> tuple[str, str]:
    """Inside a container with its own cgroup namespace: the path is '/', the mount is its cgroup."""
    sysfs = root / "sys/fs/cgroup"
    v2_cgroup(sysfs, current=100 * MiB, max_=str(256 * MiB), inactive_file=10 * MiB)
    write(root / "proc/self/cgroup", "0::/\n")
    write(root / "proc/self/mountinfo",
          "600 500 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw\n")
    return str(root), str(root / "proc")


def build_v2_nested_container(root: Path) -> tuple[str, str]:
    """A container (cgroupns) that made child cgroups of its own and runs a worker in one."""
    sysfs = root / "sys/fs/cgroup"
    v2_cgroup(sysfs, current=150 * MiB, max_=str(256 * MiB))
    v2_cgroup(sysfs / "workers", current=120 * MiB, max_=str(384 * MiB))
    v2_cgroup(sysfs / "workers/w1", current=80 * MiB, inactive_file=5 * MiB)
    write(root / "proc/self/cgroup", "0::/workers/w1\n")
    write(root / "proc/self/mountinfo",
          "600 500 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw\n")
    return str(root), str(root / "proc")


def v1_cgroup(directory: Path, *, usage: int, limit: str = V1_UNLIMITED, inactive_file: int = 0,
              hierarchical: str = V1_UNLIMITED, oom_kill: int = 0) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write(directory / "memory.usage_in_bytes", f"{usage}\n")
    write(directory / "memory.limit_in_bytes", f"{limit}\n")
    write(directory / "memory.stat", f"cache {inactive_file}\nrss {usage - inactive_file}\n"
          f"hierarchical_memory_limit {hierarchical}\ntotal_inactive_file {inactive_file}\n"
          f"total_rss {usage - inactive_file}\n")
    write(directory / "memory.oom_control", f"oom_kill_disable 0\nunder_oom 0\noom_kill {oom_kill}\n")


def build_hybrid(root: Path) -> tuple[str, str]:
    """systemd hybrid: v1 controllers (memory among them) plus an empty cgroup2 at unified/."""
    mem = root / "sys/fs/cgroup/memory"
    v1_cgroup(mem, usage=4000 * MiB)
    v1_cgroup(mem / "system.slice", usage=1000 * MiB)
    v1_cgroup(mem / "system.slice/app.service", usage=70 * MiB, limit=str(100 * MiB),
              inactive_file=20 * MiB, hierarchical=str(100 * MiB), oom_kill=1)
    (root / "sys/fs/cgroup/unified/system.slice/app.service").mkdir(parents=True)
    (root / "sys/fs/cgroup/cpu,cpuacct/system.slice/app.service").mkdir(parents=True)
    write(root / "proc/self/cgroup",
          "12:memory:/system.slice/app.service\n"
          "11:cpu,cpuacct:/system.slice/app.service\n"
          "1:name=systemd:/system.slice/app.service\n"
          "0::/system.slice/app.service\n")
    write(root / "proc/self/mountinfo",
          "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
          "25 22 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755\n"
          "26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw\n"
          "27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup "
          "rw,xattr,name=systemd\n"
          "30 25 0:28 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory\n"
          "31 25 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup "
          "rw,cpu,cpuacct\n")
    return str(root), str(root / "proc")


def build_v1_docker(root: Path) -> tuple[str, str]:
    """A Docker container on v1 without cgroupns: the mount root is the container's cgroup, and
    the limit is set on an ancestor the container cannot see (only hierarchical_memory_limit tells)."""
    mem = root / "sys/fs/cgroup/memory"
    v1_cgroup(mem, usage=50 * MiB, inactive_file=5 * MiB, hierarchical=str(192 * MiB))
    write(root / "proc/self/cgroup", "9:memory:/docker/0123abcd\n1:name=systemd:/docker/0123abcd\n")
    write(root / "proc/self/mountinfo",
          "700 600 0:40 /docker/0123abcd /sys/fs/cgroup/memory ro,nosuid,nodev,noexec,relatime - cgroup "
          "cgroup rw,memory\n")
    return str(root), str(root / "proc")


def build_no_memory(root: Path) -> tuple[str, str]:
    """v2 where the memory controller is not delegated to our cgroup."""
    sysfs = root / "sys/fs/cgroup"
    write(sysfs / "cgroup.controllers", "cpu io pids\n")
    (sysfs / "app").mkdir(parents=True)
    write(sysfs / "app/cgroup.controllers", "cpu pids\n")
    write(root / "proc/self/cgroup", "0::/app\n")
    write(root / "proc/self/mountinfo", MOUNTINFO_V2)
    return str(root), str(root / "proc")


def build_escaped_path(root: Path) -> tuple[str, str]:
    """A mount point with a space, escaped as \\040 in mountinfo."""
    sysfs = root / "sys/fs/my cgroup"
    v2_cgroup(sysfs / "svc", current=10 * MiB, max_=str(64 * MiB))
    write(sysfs / "cgroup.controllers", "memory\n")
    write(root / "proc/self/cgroup", "0::/svc\n")
    write(root / "proc/self/mountinfo",
          "25 22 0:23 / /sys/fs/my\\040cgroup rw,relatime - cgroup2 cgroup2 rw\n")
    return str(root), str(root / "proc")


def dir_of(rootfs: str, *parts: str) -> str:
    return os.path.join(rootfs, *parts)
