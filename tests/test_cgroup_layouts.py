"""cgroup discovery on fixture trees (v2, hybrid, containers) and on this machine's real hierarchy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.fixture_trees import (
    MiB,
    build_escaped_path,
    build_hybrid,
    build_no_memory,
    build_v1_docker,
    build_v2_container,
    build_v2_host,
    build_v2_nested_container,
    dir_of,
)

from rtml_ebpf import _cgroup
from rtml_ebpf._rules import Rule, Threshold
from rtml_ebpf.backends.poll import PollBackend


def test_v2_kubernetes_host_view(tmp_path: Path) -> None:
    rootfs, procfs = build_v2_host(tmp_path)
    cg = _cgroup.find_process_cgroup(procfs=procfs, rootfs=rootfs)
    assert cg.version == 2
    assert cg.path.endswith("/cri-containerd-abc.scope")
    assert cg.directory == dir_of(rootfs, "sys/fs/cgroup", cg.path.lstrip("/"))
    assert cg.read_usage() == 200 * MiB
    assert cg.read_inactive_file() == 30 * MiB
    info = cg.effective_limit()
    # the container has no limit; the pod's 512 MiB is tighter than kubepods' 8 GiB
    assert info.limit_bytes == 512 * MiB
    assert info.source is not None and info.source.endswith("kubepods-burstable-pod1234.slice")
    assert [lim for _, lim in info.limited] == [512 * MiB, 8192 * MiB]
    assert cg.oom_kills() == 2
    assert cg.depth == 4


def test_v2_container_with_cgroup_namespace(tmp_path: Path) -> None:
    rootfs, procfs = build_v2_container(tmp_path)
    cg = _cgroup.find_process_cgroup(procfs=procfs, rootfs=rootfs)
    assert (cg.version, cg.path) == (2, "/")
    assert cg.directory == dir_of(rootfs, "sys/fs/cgroup")
    assert cg.effective_limit().limit_bytes == 256 * MiB
    assert cg.ancestors() == [cg.directory]


def test_v2_nested_cgroups_inside_container(tmp_path: Path) -> None:
    rootfs, procfs = build_v2_nested_container(tmp_path)
    cg = _cgroup.find_process_cgroup(procfs=procfs, rootfs=rootfs)
    assert cg.directory == dir_of(rootfs, "sys/fs/cgroup/workers/w1")
    info = cg.effective_limit()
    # w1 unlimited, workers 384 MiB, the container root 256 MiB: the root is the tightest
    assert info.limit_bytes == 256 * MiB
    assert info.source == dir_of(rootfs, "sys/fs/cgroup")


def test_hybrid_prefers_the_v1_memory_hierarchy(tmp_path: Path) -> None:
    rootfs, procfs = build_hybrid(tmp_path)
    cg = _cgroup.find_process_cgroup(procfs=procfs, rootfs=rootfs)
    assert cg.version == 1
    assert cg.directory == dir_of(rootfs, "sys/fs/cgroup/memory/system.slice/app.service")
    assert cg.read_usage() == 70 * MiB
    assert cg.read_inactive_file() == 20 * MiB  # v1 reads total_inactive_file
    info = cg.effective_limit()
    assert info.limit_bytes == 100 * MiB and info.source == cg.directory
    assert cg.oom_kills() == 1


def test_v1_container_sees_ancestor_limit_only_through_hierarchical_limit(tmp_path: Path) -> None:
    rootfs, procfs = build_v1_docker(tmp_path)
    cg = _cgroup.find_process_cgroup(procfs=procfs, rootfs=rootfs)
    assert cg.path == "/docker/0123abcd"
    assert cg.directory == dir_of(rootfs, "sys/fs/cgroup/memory")
    info = cg.effective_limit()
    assert info.limit_bytes == 192 * MiB
    assert info.source is not None and "above the cgroup mount root" in info.source


def test_unlimited_is_none_never_a_huge_number(tmp_path: Path) -> None:
    rootfs, procfs = build_hybrid(tmp_path)
    cg = _cgroup.cgroup_from_directory(dir_of(rootfs, "sys/fs/cgroup/memory/system.slice"), procfs=procfs,
                                       rootfs=rootfs)
    assert cg.read_limit() is None
    assert cg.effective_limit().limit_bytes is None
    assert _cgroup.parse_limit("max\n") is None
    assert _cgroup.parse_limit("9223372036854771712") is None
    assert _cgroup.parse_limit("134217728") == 128 * MiB


def test_poll_backend_on_fixture_uses_pod_limit_and_working_set(tmp_path: Path) -> None:
    rootfs, procfs = build_v2_host(tmp_path)
    cg = _cgroup.find_process_cgroup(procfs=procfs, rootfs=rootfs)
    backend = PollBackend(cg, "test")
    # the pod holds 300 MiB of its 512: 212 MiB of room; as the pod sees it we use 300 MiB
    ws_rule = Rule("working_set", Threshold(ppm=500_000), Threshold(ppm=500_000))
    usage_rule = Rule("usage", Threshold(ppm=500_000), Threshold(ppm=500_000))
    ws_flag = backend.add_rule(ws_rule)
    usage_flag = backend.add_rule(usage_rule)
    snap = backend.snapshot()
    assert snap.limit == 512 * MiB
    assert snap.headroom == 212 * MiB
    assert snap.used == 300 * MiB
    assert snap.working_set == 270 * MiB  # 300 - the container's 30 MiB inactive_file
    assert usage_flag[0] is True  # 300 >= 256
    assert ws_flag[0] is True  # 270 >= 256
    Path(cg.directory, "memory.stat").write_text("inactive_file 60000000\n")
    backend2 = PollBackend(cg, "test")
    assert backend2.add_rule(ws_rule)[0] is False  # 300 MiB - 57 MiB < 256 MiB


def test_v2_root_has_no_accounting(tmp_path: Path) -> None:
    rootfs, procfs = build_v2_host(tmp_path)
    Path(procfs, "self/cgroup").write_text("0::/\n")
    with pytest.raises(LookupError, match="cgroup v2 root .* run it in a child cgroup"):
        _cgroup.find_process_cgroup(procfs=procfs, rootfs=rootfs)
    cg = _cgroup.find_process_cgroup(procfs=procfs, rootfs=rootfs, require_accounting=False)
    assert cg.directory == dir_of(rootfs, "sys/fs/cgroup")


def test_missing_memory_controller(tmp_path: Path) -> None:
    rootfs, procfs = build_no_memory(tmp_path)
    with pytest.raises(LookupError, match="no memory controller.*subtree_control"):
        _cgroup.find_process_cgroup(procfs=procfs, rootfs=rootfs)
    with pytest.raises(LookupError, match="no memory controller"):
        _cgroup.cgroup_from_directory(dir_of(rootfs, "sys/fs/cgroup/app"), procfs=procfs, rootfs=rootfs)


def test_v1_hierarchy_without_memory_controller(tmp_path: Path) -> None:
    rootfs, procfs = build_hybrid(tmp_path)
    with pytest.raises(LookupError, match="without the memory controller"):
        _cgroup.cgroup_from_directory(dir_of(rootfs, "sys/fs/cgroup/cpu,cpuacct/system.slice/app.service"),
                                      procfs=procfs, rootfs=rootfs)


def test_path_outside_cgroup_mount_and_missing(tmp_path: Path) -> None:
    rootfs, procfs = build_v2_host(tmp_path)
    with pytest.raises(LookupError, match="outside every cgroup mount"):
        _cgroup.cgroup_from_directory(str(tmp_path), procfs=procfs, rootfs=rootfs)
    with pytest.raises(LookupError, match="no such directory"):
        _cgroup.cgroup_from_directory(dir_of(rootfs, "sys/fs/cgroup/nope"), procfs=procfs, rootfs=rootfs)


def test_escaped_mount_point(tmp_path: Path) -> None:
    rootfs, procfs = build_escaped_path(tmp_path)
    cg = _cgroup.find_process_cgroup(procfs=procfs, rootfs=rootfs)
    assert cg.directory == dir_of(rootfs, "sys/fs/my cgroup/svc")
    assert cg.effective_limit().limit_bytes == 64 * MiB


def test_unknown_pid_is_a_lookup_error() -> None:
    with pytest.raises(LookupError, match="pid=999999999: no such process"):
        _cgroup.find_process_cgroup(999999999)


@given(st.lists(st.text(alphabet="abc -\\_.", min_size=1, max_size=8), min_size=1, max_size=4))
def test_mountinfo_unescape_roundtrip(parts: list[str]) -> None:
    path = "/" + "/".join(parts)
    escaped = path.replace("\\", "\\134").replace(" ", "\\040")
    line = f"25 22 0:23 / {escaped} rw - cgroup2 cgroup2 rw\n"
    (mount,) = _cgroup.parse_mountinfo(line)
    assert mount.mount_point == path


def test_this_machines_real_memory_cgroup() -> None:
    cg = _cgroup.find_process_cgroup()
    assert os.path.isdir(cg.directory)
    assert cg.read_usage() > 0
    assert cg.cgroup_id == os.stat(cg.directory).st_ino
    info = cg.effective_limit()
    assert info.limit_bytes is None or info.limit_bytes > 0
    with open(f"/proc/{os.getpid()}/cgroup") as f:
        text = f.read()
    assert cg.path in text
