"""memory.high and PSI readings on fixture trees: the ceiling rule both backends and the BPF
programs apply, memory.pressure parsing, the stall meter's window, the agent's trigger text and
the watch view's parsing of the new series."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rtml_ebpf import _cgroup
from rtml_ebpf._high import binding, ceiling, ceiling_used
from rtml_ebpf._psi import absent_reason, parse_pressure, read_pressure
from rtml_ebpf._rules import Rule, Threshold
from rtml_ebpf._stall import READ_EVERY_NS, StallMeter
from rtml_ebpf.agent.psi import trigger
from rtml_ebpf.config import PAGE_SIZE
from rtml_ebpf.ebpf import abi
from rtml_ebpf.ebpf.words import room_from_pages
from rtml_ebpf.watch import parse_metrics

MiB = 1 << 20


def test_the_ceiling_is_the_lower_of_max_and_high() -> None:
    assert (ceiling(256 * MiB, None), binding(256 * MiB, None)) == (256 * MiB, "max")
    assert (ceiling(256 * MiB, 96 * MiB), binding(256 * MiB, 96 * MiB)) == (96 * MiB, "high")
    assert (ceiling(None, 96 * MiB), binding(None, 96 * MiB)) == (96 * MiB, "high")
    assert (ceiling(64 * MiB, 96 * MiB), binding(64 * MiB, 96 * MiB)) == (64 * MiB, "max")
    assert (ceiling(None, None), binding(None, None)) == (None, None)
    # used as the tightest boundary sees it: the least room, to max or to high
    assert ceiling_used(10 * MiB, None, None, None, None) == 10 * MiB
    assert ceiling_used(10 * MiB, 256 * MiB, 200 * MiB, 96 * MiB, 50 * MiB) == 46 * MiB  # a busy sibling
    assert ceiling_used(10 * MiB, 256 * MiB, 246 * MiB, None, None) == 10 * MiB


def test_the_slot_words_resolve_fractions_against_high() -> None:
    rule = Rule("usage", Threshold(ppm=900_000), Threshold(ppm=900_000))
    pages = MiB // PAGE_SIZE
    usage = 50 * pages
    # max 256 MiB, high 96 MiB: the trip point is 0.9 of 96 MiB, the OOM room stays the room to max
    room, oom_room = room_from_pages(usage, 256 * pages, 206 * pages, 0, rule, 96 * pages, 46 * pages)
    assert room == 96 * MiB * 9 // 10 - 50 * MiB
    assert oom_room == 206 * MiB
    # no high: as before
    room, _ = room_from_pages(usage, 256 * pages, 206 * pages, 0, rule)
    assert room == 256 * MiB * 9 // 10 - 50 * MiB
    # high only
    room, oom_room = room_from_pages(usage, abi.UNLIMITED_PAGES, abi.UNLIMITED_PAGES, 0, rule, 96 * pages,
                                     46 * pages)
    assert room == 96 * MiB * 9 // 10 - 50 * MiB and oom_room is None


PRESSURE = "some avg10=12.50 avg60=3.10 avg300=0.70 total=4567890\nfull avg10=4.25 avg60=1.00 avg300=0.20 total=1234\n"


def test_memory_pressure_is_parsed() -> None:
    p = parse_pressure(PRESSURE)
    assert (p.some_avg10, p.some_total_us, p.full_avg10, p.full_total_us) == (12.5, 4567890, 4.25, 1234)


def _v2_cgroup(tmp_path: Path) -> _cgroup.MemoryCgroup:
    d = tmp_path / "app"
    d.mkdir()
    mount = _cgroup.Mount(2, "/", str(tmp_path), frozenset())
    return _cgroup.MemoryCgroup(2, "/app", str(d), mount)


def test_high_on_the_path_and_pressure_from_the_files(tmp_path: Path) -> None:
    cg = _v2_cgroup(tmp_path)
    (tmp_path / "memory.high").write_text("max\n")
    (tmp_path / "app" / "memory.high").write_text(f"{96 * MiB}\n")
    assert cg.effective_high() == _cgroup.LimitInfo(96 * MiB, cg.directory, ((cg.directory, 96 * MiB),))
    (tmp_path / "memory.high").write_text(f"{64 * MiB}\n")  # the parent's is lower: it binds
    assert cg.effective_high().limit_bytes == 64 * MiB and cg.effective_high().source == str(tmp_path)
    psi, why = read_pressure(cg)
    assert psi is None and why is not None and ("memory.pressure is missing" in why or "no PSI" in why), why
    (tmp_path / "app" / "memory.pressure").write_text(PRESSURE)
    psi, why = read_pressure(cg)
    assert why is None and psi is not None and psi.some_avg10 == 12.5


def test_v1_has_no_high_and_no_pressure(tmp_path: Path) -> None:
    mount = _cgroup.Mount(1, "/", str(tmp_path), frozenset({"memory"}))
    cg = _cgroup.MemoryCgroup(1, "/", str(tmp_path), mount)
    (tmp_path / "memory.high").write_text(f"{MiB}\n")  # not a v1 file: never read there
    assert cg.read_high() is None and cg.effective_high().limit_bytes is None
    psi, why = read_pressure(cg)
    assert psi is None and why == absent_reason(cg) and "cgroup v1" in why


def test_the_stall_meter_measures_a_second_of_totals(tmp_path: Path) -> None:
    cg = _v2_cgroup(tmp_path)
    f = tmp_path / "app" / "memory.pressure"

    def write(total_us: int) -> None:
        f.write_text(f"some avg10=0.00 avg60=0.00 avg300=0.00 total={total_us}\n"
                     "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")

    meter = StallMeter(cg)
    total = 0
    write(total)
    assert not meter.stalling()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.6:  # stalled 50% of the time: stalling
        time.sleep(READ_EVERY_NS / 1e9)
        total += 50_000
        write(total)
        meter.stalling()
    assert meter.stalling()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.3:  # then 5%: not any more once the window passed
        time.sleep(READ_EVERY_NS / 1e9)
        total += 5_000
        write(total)
        meter.stalling()
    assert not meter.stalling()
    os.unlink(f)  # a failed read answers "not stalling", never raises
    time.sleep(READ_EVERY_NS / 1e9)
    assert not meter.stalling()


def test_the_agent_trigger_keeps_the_share_and_ends_in_nul() -> None:
    assert trigger(1_000_000) == b"some 150000 1000000\0"
    assert trigger(2_000_000) == b"some 300000 2000000\0"


def test_watch_reads_high_binding_and_pressure() -> None:
    lab = 'cgroup="/app",pod_uid="",container_id="",qos="",runtime=""'
    text = "\n".join([
        f"rtml_cgroup_usage_bytes{{{lab}}} 100",
        f"rtml_cgroup_limit_bytes{{{lab}}} 1000",
        f"rtml_cgroup_high_bytes{{{lab}}} 500",
        f'rtml_cgroup_ceiling_bytes{{{lab},binding="high"}} 500',
        f'rtml_cgroup_pressure_avg10{{{lab},stall="some"}} 12.5',
        f'rtml_cgroup_pressure_avg10{{{lab},stall="full"}} 3',
        f"rtml_cgroup_stalling{{{lab}}} 1",
    ])
    (row,) = parse_metrics(text)
    assert (row.high_bytes, row.binding, row.pressure_some_avg10, row.stalling) == (500, "high", 12.5, True)


def test_shed_at_lists_stall() -> None:
    from rtml_ebpf.admission.policy import SHED_AT

    assert "stall" in SHED_AT


def test_the_poll_backend_trips_at_a_fraction_of_high_on_a_fixture_tree(tmp_path: Path) -> None:
    from rtml_ebpf.backends.poll import PollBackend

    parent = tmp_path / "parent"
    child = parent / "child"
    child.mkdir(parents=True)
    for d, files in ((parent, {"memory.max": str(256 * MiB), "memory.high": str(96 * MiB),
                               "memory.current": str(80 * MiB)}),
                     (child, {"memory.max": "max", "memory.high": "max", "memory.current": str(70 * MiB),
                              "memory.stat": "inactive_file 0\n", "memory.events": "oom_kill 0\n"})):
        for name, text in files.items():
            (d / name).write_text(text)
    mount = _cgroup.Mount(2, "/", str(tmp_path), frozenset())
    cg = _cgroup.MemoryCgroup(2, "/parent/child", str(child), mount)
    backend = PollBackend(cg, "test", min_interval=0.0, limit_interval=0.0)
    flag = backend.add_rule(Rule("usage", Threshold(ppm=900_000), Threshold(ppm=900_000)))
    snap = backend.snapshot(flag)
    assert (snap.limit, getattr(snap, "high", None), getattr(snap, "high_source", None)) == (
        256 * MiB, 96 * MiB, str(parent))
    assert snap.used == 80 * MiB  # the parent's usage: the sibling's share counts under a shared high
    assert snap.headroom == 176 * MiB  # the room to memory.max, where the OOM killer acts
    assert not backend.hot(flag)[0]  # 80 MiB < 0.9 of 96 MiB
    assert backend.room(flag) == (96 * MiB * 9 // 10 - 80 * MiB, 176 * MiB)
    (parent / "memory.current").write_text(str(87 * MiB))
    assert backend.hot(flag)[0]  # 87 MiB >= 86.4 MiB: tripped, 9 MiB before the kernel throttles
    (parent / "memory.high").write_text("max")
    assert not backend.hot(flag)[0]  # the ceiling is memory.max again
