"""The benchmarks' child memory cgroups, and the two readings of a cgroup they need that the
public API does not give.

The cgroups are the demo's (rtml_ebpf.demo.cgroups: made under our own memory cgroup, removed
afterwards); this module adds the cgroup's path in its hierarchy (the agent's ``--watch`` glob
names cgroups by it) and the kernel's working set from the files (the truth P8 holds stats()
against). Both come from the private rtml_ebpf._cgroup, read here and nowhere else in
benchmarks/, so a change there is fixed in one place.
"""

from __future__ import annotations

from rtml_ebpf import _cgroup
from rtml_ebpf.demo.cgroups import ChildCgroup, stop_process

__all__ = ["ChildCgroup", "children_glob", "stop_process", "working_set_from_files"]


def children_glob(directory: str) -> str:
    """A ``--watch`` glob matching the children of the cgroup at ``directory`` (paths from the
    hierarchy's root, as the agent names cgroups)."""
    return _cgroup.cgroup_from_directory(directory).path.rstrip("/") + "/*"


def working_set_from_files(directory: str) -> int:
    """usage - inactive_file, read from the cgroup's own files at this moment."""
    mc = _cgroup.cgroup_from_directory(directory)
    return mc.read_usage() - mc.read_inactive_file()
