"""Real memory cgroups with real limits: the poll backend, and the eBPF backend on this kernel.

Each test makes its cgroups under the test process's own memory cgroup with
small limits and removes them. The allocating process runs inside the cgroup;
the checks run in that process, as a service would.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import pytest
from support.cgroups import WORKLOADS, MiB, make_cgroup, needs_bpf, needs_cgroups, wait_until

from rtml_ebpf import Limiter
from rtml_ebpf.ebpf.runtime import Runtime

pytestmark = pytest.mark.root

ALLOC = [WORKLOADS, "alloc"]
NCPU = os.cpu_count() or 1
KERNEL = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])
BATCH = 64 * 4096 * NCPU  # MEMCG_CHARGE_BATCH pages per CPU


def alloc_args(threshold: int, backend: str, *, step_kib: int = 1024, max_mib: int = 400,
               metric: str = "usage", poll_interval: float | None = None, contend: bool = False) -> list[str]:
    args = [*ALLOC, "--threshold", str(threshold), "--backend", backend, "--step-kib", str(step_kib),
            "--max-mib", str(max_mib), "--metric", metric] + (["--contend"] if contend else [])
    if poll_interval is not None:
        args += ["--poll-interval", str(poll_interval)]
    return args


@needs_cgroups
@pytest.mark.vm
def test_poll_limiter_flips_before_oom_kill() -> None:
    with make_cgroup(limit=128 * MiB) as cg:
        threshold = int(0.8 * 128 * MiB)
        out = cg.run_python(alloc_args(threshold, "poll", poll_interval=0.0))
        assert out["backend"] == "poll"
        assert out["tripped"] is True, out
        assert out["usage_at_flip"] >= threshold
        assert out["allocated"] < 128 * MiB
        assert cg.oom_kills() == 0


@pytest.mark.vm
@needs_cgroups
def test_poll_limiter_stays_fresh_while_another_thread_checks() -> None:
    # A second thread checking in a loop must not leave the allocating thread with stale
    # answers (a refresh that held a lock across its file reads did, under GIL contention).
    with make_cgroup(limit=128 * MiB) as cg:
        threshold = int(0.8 * 128 * MiB)
        out = cg.run_python(alloc_args(threshold, "poll", poll_interval=0.0, contend=True))
        assert out["tripped"] is True, out
        assert out["overshoot"] <= 4 * MiB, out
        assert cg.oom_kills() == 0


@needs_cgroups
@pytest.mark.vm
def test_unguarded_allocation_is_oom_killed() -> None:
    # The control: without the check the same workload dies, so the test above can fail.
    with make_cgroup(limit=64 * MiB) as cg:
        p = cg.popen([sys.executable, WORKLOADS, "hog", "--mib", "200"])
        p.communicate(timeout=60)
        assert p.returncode == -9
        assert cg.oom_kills() >= 1


@needs_bpf
@needs_cgroups
@pytest.mark.vm
def test_ebpf_limiter_flips_with_small_overshoot() -> None:
    with make_cgroup(limit=128 * MiB) as cg:
        threshold = int(0.9 * 128 * MiB)
        out = cg.run_python(alloc_args(threshold, "ebpf"))
        assert out["backend"] == "ebpf"
        # 6.13+: the memcg events; older kernels: the fault hook set
        assert "memcg_lruvec" in out["hooks"] or (KERNEL < (6, 13) and "page_fault_user" in out["hooks"])
        assert out["tripped"] is True, out
        assert out["overshoot"] <= 2 * MiB, out
        assert cg.oom_kills() == 0


@needs_bpf
@needs_cgroups
@pytest.mark.vm
def test_lean_hook_set_flips_before_the_oom_kill_within_2_mib() -> None:
    with make_cgroup(limit=128 * MiB) as cg:
        threshold = int(0.9 * 128 * MiB)
        out = cg.run_python(alloc_args(threshold, "ebpf"), env={"RTML_HOOKS": "lean"})
        assert set(out["hooks"]) <= {"page_fault_user", "page_alloc", "oom_victim"}
        assert "page_fault_user" in out["hooks"]
        assert out["tripped"] is True, out
        assert out["overshoot"] <= 2 * MiB, out
        assert out["stats"]["faults"] > 0
        assert cg.oom_kills() == 0


@needs_bpf
@needs_cgroups
def test_ebpf_usage_matches_kernel_file_at_rest() -> None:
    with make_cgroup(limit=256 * MiB) as cg, Limiter(cg.directory, backend="ebpf", metric="usage") as lim:
        p = cg.popen([sys.executable, WORKLOADS, "hog", "--mib", "40"])
        assert p.stdout is not None
        json.loads(p.stdout.readline())  # holding 40 MiB now
        time.sleep(0.2)
        s = lim.stats()
        file_usage = cg.usage()
        assert abs(s.usage_bytes - file_usage) <= BATCH, (s.usage_bytes, file_usage)
        assert s.usage_bytes > 40 * MiB
        assert s.limit_bytes == 256 * MiB
        assert s.faults is None  # the default hook set leaves page_fault_user off while memcg events are live
        p.kill()
        p.wait()


@needs_bpf
@needs_cgroups
def test_all_hooks_count_faults_and_growth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTML_HOOKS", "all")
    with make_cgroup(limit=256 * MiB) as cg, Limiter(cg.directory, backend="ebpf", metric="usage") as lim:
        assert "page_fault_user" in lim.stats().hooks
        p = cg.popen([sys.executable, WORKLOADS, "hog", "--mib", "40"])
        assert p.stdout is not None
        json.loads(p.stdout.readline())
        s = lim.stats()
        assert s.faults is not None and s.faults >= 40 * MiB // 4096 // 2  # the hog's first-touch faults
        snap = lim._backend.snapshot(lim._handle)
        # The hog maps shared anonymous memory (shmem): NR_FILE_PAGES counts it, NR_ANON_MAPPED the rest.
        assert snap.growth["anon"][0] + snap.growth["file"][0] >= 40 * MiB
        p.kill()
        p.wait()


@needs_bpf
@needs_cgroups
@pytest.mark.vm
def test_parent_limit_is_the_effective_limit() -> None:
    with make_cgroup(limit=128 * MiB) as parent, make_cgroup(parent=parent) as child:
        with Limiter(child.directory, backend="ebpf", threshold=0.5, metric="usage") as lim, \
                Limiter(child.directory, backend="poll", threshold=0.5, metric="usage", poll_interval=0) as poll:
            assert poll.stats().limit_bytes == 128 * MiB
            assert poll.stats().limit_source == parent.directory
            assert lim.is_mem_limit_reached() is False
            p = child.popen([sys.executable, WORKLOADS, "hog", "--mib", "80"])
            assert p.stdout is not None
            json.loads(p.stdout.readline())
            s = lim.stats()
            assert s.limit_bytes == 128 * MiB
            assert s.limit_source == parent.directory
            assert lim.is_mem_limit_reached() is True  # 80 MiB > half of the parent's 128
            rt = Runtime.current()
            assert rt is not None
            handle = lim._handle
            slot = rt.read_slot(handle.slot)
            assert slot.trip_pages[handle.rule] * 4096 == 64 * MiB  # the kernel's own trip point
            assert wait_until(poll.is_mem_limit_reached, timeout=3)  # a refresh may be under way in the monitor
            p.kill()
            p.wait()


@needs_bpf
@needs_cgroups
@pytest.mark.vm
def test_oom_kill_is_counted_in_the_slot() -> None:
    with make_cgroup(limit=64 * MiB) as cg, Limiter(cg.directory, backend="ebpf") as lim:
        # 6.8+: counted by the oom_victim program; before, the cgroup's own counter stands in
        assert "oom_victim" in lim.stats().hooks or KERNEL < (6, 8), lim.stats().backend_reason
        p = cg.popen([sys.executable, WORKLOADS, "hog", "--mib", "200"])
        p.communicate(timeout=60)
        assert p.returncode == -9
        assert cg.oom_kills() >= 1
        assert lim.stats().oom_kills == cg.oom_kills()


def bpftool_ids(kind: str) -> dict[int, str]:
    out = subprocess.run(["bpftool", "-j", kind, "list"], capture_output=True, text=True, check=True).stdout
    return {item["id"]: item.get("name", "") for item in json.loads(out or "[]")}


@needs_bpf
@needs_cgroups
def test_a_kept_ebpf_check_keeps_watching() -> None:
    import gc

    with make_cgroup(limit=128 * MiB) as cg:
        check = Limiter(cg.directory, backend="ebpf", threshold=0.25, metric="usage").is_mem_limit_reached
        gc.collect()
        assert check() is False
        p = cg.popen([sys.executable, WORKLOADS, "hog", "--mib", "64"])
        assert p.stdout is not None
        json.loads(p.stdout.readline())
        assert check() is True  # still watched: the kernel flipped it
        p.kill()
        p.wait()
        del check
    # Collected with its check, and closed. The monitor thread may hold it for a moment while
    # it looks at it, so collect until it is gone.
    assert wait_until(lambda: gc.collect() >= 0 and Runtime.current() is None, timeout=5)


@needs_bpf
@pytest.mark.vm
def test_close_leaves_no_programs_or_links() -> None:
    assert Runtime.current() is None, "a Runtime leaked from an earlier test"
    with make_cgroup(limit=128 * MiB) as cg:
        progs_before, links_before = bpftool_ids("prog"), bpftool_ids("link")
        a = Limiter(cg.directory, backend="ebpf")
        b = Limiter(cg.directory, backend="ebpf", threshold=0.5)  # shares the loaded object
        rt = Runtime.current()
        assert rt is not None
        live = set(rt.prog_ids.values())
        assert live and live <= set(bpftool_ids("prog")) - set(progs_before)
        our_links = set(bpftool_ids("link")) - set(links_before)
        assert len(our_links) >= len(rt.hooks)
        a.close()
        assert Runtime.current() is rt  # b still holds it
        b.close()
        assert Runtime.current() is None
    # The kernel frees tracing programs after an RCU grace period: give it a moment (long
    # under software emulation).
    deadline = time.monotonic() + 30
    while live & set(bpftool_ids("prog")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not live & set(bpftool_ids("prog"))
    assert not our_links & set(bpftool_ids("link"))


@pytest.mark.vm
@needs_cgroups
def test_status_of_a_process_in_a_real_cgroup() -> None:
    with make_cgroup(limit=96 * MiB) as cg:
        holder = cg.hold()
        holder.change(20)
        out = subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "status", "--json", "--backend", "poll",
                              "--pid", str(holder.proc.pid), "--metric", "usage"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        s = json.loads(out.stdout)
        assert s["cgroup_dir"] == cg.directory and s["cgroup_version"] == cg.version
        assert s["limit_bytes"] == 96 * MiB and s["limit_source"] == cg.directory
        assert abs(s["usage_bytes"] - cg.usage()) <= BATCH
        assert s["threshold_bytes"] == int(0.9 * 96 * MiB)


@pytest.mark.vm
@needs_bpf
@needs_cgroups
@pytest.mark.parametrize("backend", ["ebpf", "poll"])
def test_working_set_excludes_inactive_file_cache(backend: str) -> None:
    # A file on a filesystem with a page cache (not tmpfs, whose pages are shmem): the repo.
    data_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            ".pytest-data")
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, f"cache-{backend}.bin")
    with open(path, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # not cached by us: read in the cgroup
    try:
        with make_cgroup(limit=256 * MiB) as cg, \
                Limiter(cg.directory, backend=backend, metric="usage", threshold=80 * MiB, poll_interval=0,
                        relief=False) as by_usage, \
                Limiter(cg.directory, backend=backend, metric="working_set", threshold=80 * MiB, poll_interval=0,
                        relief=False) as by_ws:
            reader = cg.popen([sys.executable, "-c", (
                "import sys, time\n"
                f"f = open({path!r}, 'rb')\n"
                "while f.read(1 << 20): pass\n"
                "buf = bytearray(20 << 20); buf[::4096] = b'x' * (len(buf) // 4096)\n"
                "print('ready', flush=True); time.sleep(60)\n")])
            assert reader.stdout is not None
            assert reader.stdout.readline().strip() == "ready"
            assert wait_until(by_usage.is_mem_limit_reached, timeout=5), by_usage.stats()
            s = by_ws.stats()
            assert s.usage_bytes >= 96 * MiB  # the file is in the cgroup's page cache...
            assert s.working_set_bytes < 80 * MiB, s  # ...and most of it is inactive: not working set
            assert wait_until(lambda: not by_ws.is_mem_limit_reached(), timeout=5), s
            reader.kill()
            reader.wait()
    finally:
        os.unlink(path)


@needs_bpf
@needs_cgroups
def test_a_forked_child_closing_its_copy_does_not_unwatch_the_parent() -> None:
    with make_cgroup(limit=128 * MiB) as cg, Limiter(cg.directory, backend="ebpf", threshold=0.5,
                                                     metric="usage", relief=False) as lim:
        parent_runtime = Runtime.current()
        pid = os.fork()
        if pid == 0:  # a pre-fork worker that makes its own limiter, then shuts down
            code = 1
            try:
                with Limiter(cg.directory, backend="ebpf", relief=False):
                    code = 0 if Runtime.current() is not parent_runtime else 2  # its own programs
                lim.close()
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
        holder = cg.hold()
        holder.change(80)
        assert wait_until(lim.is_mem_limit_reached, timeout=5)  # still fed by the kernel
        holder.change(-200)
        assert wait_until(lambda: not lim.is_mem_limit_reached(), timeout=5)


@needs_bpf
@needs_cgroups
def test_nested_watched_cgroups_both_follow_the_child() -> None:
    # A pod and its container, both watched: one event in the container refreshes both slots.
    with make_cgroup(limit=128 * MiB) as pod, make_cgroup(parent=pod) as ctr, \
            Limiter(pod.directory, backend="ebpf", threshold=0.5, metric="usage", relief=False) as by_pod, \
            Limiter(ctr.directory, backend="ebpf", threshold=96 * MiB, metric="usage", relief=False) as by_ctr:
        holder = ctr.hold()
        holder.change(70)
        assert wait_until(by_pod.is_mem_limit_reached)  # 70+ MiB > 64 (half the pod's 128)
        assert not by_ctr.is_mem_limit_reached()  # < 96 MiB
        holder.change(30)
        assert wait_until(by_ctr.is_mem_limit_reached)
        s_pod, s_ctr = by_pod.stats(), by_ctr.stats()
        assert abs(s_pod.usage_bytes - pod.usage()) <= BATCH and abs(s_ctr.usage_bytes - ctr.usage()) <= BATCH
        assert s_ctr.limit_bytes == 128 * MiB and s_ctr.limit_source == pod.directory
