"""Fault matrix, lifecycle: fork during the load, readings racing close, kept checks after
close, dropped limiters without the GC, a cgroup removed and made again, capacity.
Each test names the defect of issue 12 it keeps fixed; each fails on the code before it."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import threading
import time

import pytest
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups, wait_until

from rtml_ebpf import CapacityError, CgroupNotFound, Limiter, RtmlError
from rtml_ebpf.ebpf.abi import NESTED_WATCHES
from rtml_ebpf.ebpf.runtime import Runtime

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

FORK_DURING_LOAD = """
import os, sys, time, rtml_ebpf
from rtml_ebpf import Limiter
rtml_ebpf.is_mem_limit_reached()      # starts the background BPF load (~100 ms, holds the load lock)
time.sleep(float(sys.argv[1]))
pid = os.fork()
if pid == 0:
    t0 = time.monotonic()
    lim = Limiter(backend="ebpf", relief=False)   # hung forever on the inherited held lock
    d = rtml_ebpf.default_limiter()               # waited ~30 s for a thread the child does not have
    ok = lim.backend == "ebpf" and time.monotonic() - t0 < 10
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.12])
def test_1_fork_at_every_stage_of_the_background_load(delay: float) -> None:
    out = subprocess.run([sys.executable, "-c", FORK_DURING_LOAD, str(delay)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0", out.stderr


def test_2_stats_racing_close_reads_only_an_open_runtime() -> None:
    errors: list[BaseException] = []
    with make_cgroup(limit=64 * MiB) as cg:
        for _ in range(30):
            lim = Limiter(cg.directory, backend="ebpf", relief=False)
            stop = threading.Event()

            def reader(lim: Limiter = lim, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    try:
                        lim.stats()
                    except RtmlError:
                        pass  # closed: the documented answer
                    except BaseException as exc:  # noqa: BLE001
                        errors.append(exc)
                        return

            threads = [threading.Thread(target=reader) for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(0.01)
            lim.close()  # the last Limiter: the runtime and its maps go
            # another runtime now reuses the fd numbers the readers would have read through
            other = Limiter(cg.directory, backend="ebpf", relief=False, threshold=0.5)
            time.sleep(0.01)
            stop.set()
            for t in threads:
                t.join()
            other.close()
    assert not errors, errors[:3]


@pytest.mark.parametrize("fail_closed", [False, True])
def test_4_a_kept_check_never_answers_for_another_cgroup(fail_closed: bool) -> None:
    with make_cgroup(limit=128 * MiB) as busy, make_cgroup(limit=128 * MiB) as empty:
        holder = busy.hold()
        holder.change(40)
        lim = Limiter(busy.directory, backend="ebpf", threshold=8 * MiB, metric="usage", relief=False,
                      fail_closed=fail_closed)
        check = lim.is_mem_limit_reached
        assert wait_until(check)  # 40 MiB > 8 MiB
        lim.close()
        assert check() is fail_closed  # the fail answer, from now on
        # Other cgroups are watched: the kept check's slot is not lent to them.
        others = [Limiter(empty.directory, backend="ebpf", threshold=4096 * (i + 2), metric="usage",
                          relief=False) for i in range(3)]
        assert check() is fail_closed
        holder.change(-40)
        assert check() is fail_closed
        for o in others:
            o.close()


def test_5_dropped_limiters_are_freed_without_the_cyclic_gc() -> None:
    with make_cgroup(limit=64 * MiB) as cg:
        gc.disable()
        try:
            for _ in range(150):  # more than the 64 slots: each must be freed when dropped
                Limiter(cg.directory, backend="ebpf", relief=False).is_mem_limit_reached()
            assert Runtime.current() is None  # the last one dropped: programs detached
        finally:
            gc.enable()


def test_6_a_cgroup_removed_and_recreated_is_another_cgroup() -> None:
    with make_cgroup(limit=64 * MiB) as parent:
        path = os.path.join(parent.directory, "app")
        os.mkdir(path)
        old = Limiter(path, backend="ebpf", metric="usage", relief=False)
        os.rmdir(path)
        with pytest.raises(CgroupNotFound, match="removed"):
            old.stats()
        os.mkdir(path)
        try:
            new = Limiter(path, backend="ebpf", metric="usage", relief=False)
            assert new.cgroup_id != old.cgroup_id
            assert new.stats().cgroup_id == os.stat(path).st_ino  # its own slot, not the old one
            with pytest.raises(CgroupNotFound):
                old.stats()
            new.close()
        finally:
            old.close()
            os.rmdir(path)


def test_7_a_fifth_nested_watch_is_refused_not_silently_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    # auto on this process's own load (no shared load: root would join that one, with room)
    monkeypatch.setenv("RTML_SHARED", "0")
    with contextlib.ExitStack() as stack:
        chain = [stack.enter_context(make_cgroup(limit=128 * MiB))]
        for _ in range(NESTED_WATCHES):
            chain.append(stack.enter_context(make_cgroup(parent=chain[-1])))
        held = [Limiter(cg.directory, backend="ebpf", relief=False) for cg in chain[:NESTED_WATCHES]]
        with pytest.raises(CapacityError, match="nested"):
            Limiter(chain[-1].directory, backend="ebpf", relief=False)
        auto = Limiter(chain[-1].directory, backend="auto", relief=False)  # 10: auto falls back, saying why
        assert auto.backend == "poll" and "capacity" in auto.stats().backend_reason
        for lim in (auto, *reversed(held)):
            lim.close()


def test_10_auto_falls_back_when_rules_run_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTML_SHARED", "0")  # this process's own load's rules, as test_7
    with make_cgroup(limit=64 * MiB) as cg:
        held = [Limiter(cg.directory, backend="ebpf", threshold=0.5 + i / 10, relief=False) for i in range(4)]
        fifth = Limiter(cg.directory, backend="auto", threshold=0.95, relief=False)
        assert fifth.backend == "poll" and "capacity" in fifth.stats().backend_reason
        with pytest.raises(CapacityError):
            Limiter(cg.directory, backend="ebpf", threshold=0.95, relief=False)
        for lim in (fifth, *held):
            lim.close()
