"""Issue 21, item 9: a removed cgroup. Before: the monitor logged a full traceback about 19 times
a second, forever, and after ``mkdir`` at the same path the old Limiter answered from the new
cgroup's usage (its check and room()) while stats() raised CgroupNotFound.

Now the old Limiter answers the fail answer, room() the fail answer's pair, stats() and the
backend's readings raise CgroupNotFound, and the log holds one line (at most one traceback)."""

from __future__ import annotations

import logging
import os
import time

import pytest
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups, wait_until

from rtml_ebpf import CgroupNotFound, Limiter
from rtml_ebpf._monitor import Monitor

pytestmark = [pytest.mark.root, needs_cgroups]


@pytest.mark.parametrize("backend", ["poll", pytest.param("ebpf", marks=needs_bpf)])
def test_a_limiter_never_answers_for_a_cgroup_made_again_at_its_path(
        backend: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rtml_ebpf")
    with make_cgroup(limit=64 * MiB) as cg:
        # on_trip: the monitor looks at this limiter every 50 ms (where the tracebacks came from)
        lim = Limiter(cg.directory, backend=backend, threshold=0.5, metric="usage", relief=False,
                      on_trip=lambda s: None)
        assert lim.is_mem_limit_reached() is False and lim.room()[0] is not None
        old_id = lim.cgroup_id
        os.rmdir(cg.directory)
        time.sleep(1.2)  # removed: the monitor looks ~24 times, the limit check (1 s) runs once
        os.mkdir(cg.directory)  # another cgroup at the same path, over the old Limiter's threshold
        assert os.stat(cg.directory).st_ino != old_id
        cg.set_limit(64 * MiB)
        holder = cg.hold()
        assert holder.change(48) == 48
        assert wait_until(lambda: cg.usage() > 40 * MiB)
        deadline = time.monotonic() + 2.5  # past the 1 s limit check and poll's 1 s limit re-read
        while time.monotonic() < deadline:
            # fail open: "not reached"; answering from the new cgroup would say True at 48 of 64 MiB
            assert lim.is_mem_limit_reached() is False
            assert lim.room() == (None, None)
            time.sleep(0.01)
        with pytest.raises(CgroupNotFound):
            lim.stats()
        with pytest.raises(CgroupNotFound):
            lim._backend.room(lim._handle)
        with pytest.raises(CgroupNotFound):
            lim._backend.snapshot(lim._handle)
        # the control: a Limiter built now reads the new cgroup, which is over the threshold
        fresh = Limiter(cg.directory, backend=backend, threshold=0.5, metric="usage", relief=False)
        assert wait_until(fresh.is_mem_limit_reached, timeout=5)
        fresh.close()
        lim.close()
    text = caplog.text
    ours = [r for r in caplog.records if r.name == "rtml_ebpf" and r.levelno >= logging.WARNING]
    assert text.count("Traceback") <= 1, text
    assert len(ours) <= 3, [r.getMessage() for r in ours]


def test_the_monitor_logs_a_failing_limiter_once_then_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rtml_ebpf")
    mon = Monitor()
    lim = Limiter(backend="poll", relief=False)
    try:
        for _ in range(200):  # 10 s of looks at 50 ms
            try:
                raise FileNotFoundError(2, "No such file or directory", "memory.stat")
            except FileNotFoundError as exc:
                mon._failed(lim, exc)
        assert caplog.text.count("Traceback") == 1, caplog.text
        assert len([r for r in caplog.records if "monitor" in r.getMessage()]) == 1
        mon._failures[lim][0] -= 61  # a minute later: one summary line with the count
        try:
            raise FileNotFoundError(2, "No such file or directory", "memory.stat")
        except FileNotFoundError as exc:
            mon._failed(lim, exc)
        lines = [r.getMessage() for r in caplog.records if "monitor" in r.getMessage()]
        assert len(lines) == 2 and "200 times" in lines[1], lines
        assert caplog.text.count("Traceback") == 1
    finally:
        lim.close()
