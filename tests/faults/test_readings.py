"""Fault matrix, readings: fault-hook mode after frees, a limit changed while idle, a process
migrated, another mount namespace, huge thresholds, and a kernel BTF that is empty."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups, wait_until

from rtml_ebpf import ConfigError, Limiter

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]
BATCH = 64 * 4096 * (os.cpu_count() or 1)


@pytest.mark.vm
def test_8_lean_hooks_follow_frees_within_the_upkeep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTML_HOOKS", "lean")
    with make_cgroup(limit=256 * MiB) as cg:
        with Limiter(cg.directory, backend="ebpf", threshold=64 * MiB, metric="usage") as lim:
            assert "page_fault_user" in lim.stats().hooks
            holder = cg.hold()
            holder.change(100)
            assert wait_until(lim.is_mem_limit_reached)
            holder.change(-100)
            s = lim.stats()  # was: 186 MiB long after the free, headroom negative, not tripped
            assert abs(s.usage_bytes - cg.usage()) <= BATCH + 2 * MiB, (s.usage_bytes, cg.usage())
            assert s.headroom_bytes is not None and s.headroom_bytes > 0
            assert wait_until(lambda: not lim.is_mem_limit_reached(), timeout=3)  # within the upkeep


def test_15_a_limit_lowered_on_an_idle_cgroup_is_seen() -> None:
    with make_cgroup(limit=256 * MiB) as cg:
        holder = cg.hold()
        holder.change(40)
        with Limiter(cg.directory, backend="ebpf", threshold=0.5, metric="usage") as lim:
            assert not lim.is_mem_limit_reached()
            cg.set_limit(64 * MiB)  # nothing charges after this: no event carries the new limit
            assert wait_until(lim.is_mem_limit_reached, timeout=3)  # 40 MiB > half of 64
            assert lim.stats().limit_bytes == 64 * MiB


MIGRATES = """
import json, sys, time, rtml_ebpf
rtml_ebpf.is_mem_limit_reached()
first = rtml_ebpf.default_limiter().cgroup.directory
print(json.dumps(first), flush=True)
sys.stdin.readline()                      # the test moves us to another cgroup meanwhile
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    rtml_ebpf.is_mem_limit_reached()
    lim = rtml_ebpf.default_limiter()
    if lim.cgroup.directory != first:
        break
    time.sleep(0.05)
print(json.dumps(rtml_ebpf.default_limiter().cgroup.directory), flush=True)
"""


def test_9_the_default_limiter_follows_a_migrated_process() -> None:
    with make_cgroup(limit=128 * MiB) as a, make_cgroup(limit=128 * MiB) as b:
        p = a.popen([sys.executable, "-c", MIGRATES], stdin=subprocess.PIPE)
        assert p.stdout is not None and p.stdin is not None
        assert json.loads(p.stdout.readline()) == a.directory
        with open(os.path.join(b.directory, "cgroup.procs"), "w") as f:
            f.write(str(p.pid))
        p.stdin.write("\n")
        p.stdin.flush()
        assert json.loads(p.stdout.readline()) == b.directory
        p.wait(timeout=10)


def test_3_status_of_a_process_in_another_mount_namespace() -> None:
    with make_cgroup(limit=96 * MiB) as cg:
        # A "container": its own mount namespace, where the cgroup mounts are not ours.
        p = cg.popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                      "mount -t tmpfs none /sys/fs/cgroup && echo ready && exec sleep 60"])
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        out = subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "status", "--json", "--backend", "poll",
                              "--pid", str(p.pid)], capture_output=True, text=True, timeout=60)
        p.kill()
        assert out.returncode == 0, out.stderr
        s = json.loads(out.stdout)
        assert s["cgroup_dir"] == cg.directory  # was: the host root memcg
        assert s["limit_bytes"] == 96 * MiB


def test_11_huge_byte_thresholds_are_refused() -> None:
    with pytest.raises(ConfigError, match="beyond any memory limit"):
        Limiter(backend="ebpf", threshold=2**76 + 40960)


def test_14_an_empty_kernel_btf_is_named() -> None:
    code = ("import sys, rtml_ebpf\n"
            "try:\n    rtml_ebpf.Limiter(backend='ebpf')\n"
            "except rtml_ebpf.NotSupported as e:\n    print(e); sys.exit(4)\n")
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                          f"touch /tmp/rtml-empty-btf && mount --bind /tmp/rtml-empty-btf /sys/kernel/btf/vmlinux && "
                          f"exec {sys.executable} -c \"$0\"", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 4, out.stderr
    assert "BTF" in out.stdout and "empty" in out.stdout, out.stdout
