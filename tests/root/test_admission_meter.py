"""The kernel-fed per-request cost: what the BPF programs charge to each thread of a process
in a watched cgroup, read without a syscall."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cgroups import WORKLOADS, MiB, make_cgroup, needs_bpf, needs_cgroups

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]


def test_each_thread_and_each_async_request_is_charged_its_own_memory(tmp_path: Path) -> None:
    with make_cgroup(limit=256 * MiB) as cg:
        out = cg.run_python([WORKLOADS, "cost", str(tmp_path)])  # concurrent threads, interleaved asyncio
    assert out["source"] == "ebpf"
    assert len(out["threads"]) == 5 and len(out["async"]) == 2
    for key, (allocated, measured) in {**out["threads"], **out["async"]}.items():
        assert measured is not None, key
        assert abs(measured - allocated) <= 0.1 * allocated, (key, measured, allocated)
