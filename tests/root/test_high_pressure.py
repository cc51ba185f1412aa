"""memory.high as the ceiling of fractional thresholds, and memory pressure (PSI), in real cgroups.

Both exist per cgroup on cgroup v2 only: the v2 tests run in the VM (scripts/vmtest.sh, where a
skip fails the run) and skip here, on the v1 host, with that reason; the v1 test shows that the
host reports both as absent, with the reason, instead of a figure."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from support.cgroups import Cgroup, MiB, make_cgroup, needs_bpf, needs_cgroups, wait_until

from rtml_ebpf import Limiter, _cgroup
from rtml_ebpf.admission.policy import Policy
from rtml_ebpf.ebpf import abi
from rtml_ebpf.errors import ConfigError

pytestmark = [pytest.mark.root, needs_cgroups]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _version() -> int | None:
    try:
        return _cgroup.find_process_cgroup(require_accounting=False).version
    except Exception:  # noqa: BLE001 - needs_cgroups says why
        return None


VERSION = _version()
# memory.high and a per-cgroup memory.pressure exist on cgroup v2 only: those tests run where the
# memory controller is v2 (the VM, make vmtest) and are deselected elsewhere (tests/conftest.py
# says how many), as the v1 test is on a v2 machine. Not skipped: CI fails a skipped root test.
needs_v2 = pytest.mark.cgroup_v2
needs_v1 = pytest.mark.cgroup_v1


def _write(cg: Cgroup, name: str, value: str) -> None:
    with open(os.path.join(cg.directory, name), "w") as f:
        f.write(value)


def _events(cg: Cgroup) -> dict[str, int]:
    return _cgroup.parse_flat_keyed(_cgroup.read_text(os.path.join(cg.directory, "memory.events")))


# -- cgroup v1: absent, with the reason -------------------------------------------------------------
@needs_v1
@pytest.mark.parametrize("backend", ["poll", pytest.param("ebpf", marks=needs_bpf)])
def test_v1_reports_memory_high_and_pressure_as_absent(backend: str) -> None:
    with make_cgroup(limit=128 * MiB) as cg:
        with Limiter(cg.directory, backend=backend, threshold=0.5, relief=False) as lim:
            assert lim.cgroup.read_high() is None and lim.cgroup.effective_high().limit_bytes is None
            s = lim.stats()
            assert (s.high_bytes, s.high_source, s.binding) == (None, None, "max")
            assert s.threshold_bytes == 64 * MiB  # half of memory.max: nothing lower binds
            assert s.pressure_some_avg10 is None and s.pressure_full_total_us is None and s.stalling is None
            assert s.pressure_reason is not None and "cgroup v1 has no per-cgroup memory.pressure" in s.pressure_reason
            assert not lim.stalling()
            with pytest.raises(ConfigError, match="cgroup v1"):
                Policy("test", lim, shed_at="stall", admission=False)
            out = subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "status", "--cgroup", cg.directory],
                                 capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
            assert "cgroup v1 has no memory.high" in out.stdout, out.stdout + out.stderr


def test_shed_at_is_checked() -> None:
    with make_cgroup(limit=128 * MiB) as cg, Limiter(cg.directory, backend="poll", relief=False) as lim:
        with pytest.raises(ConfigError, match="shed_at='stalled'"):
            Policy("test", lim, shed_at="stalled", admission=False)


# -- memory.high: the ceiling ------------------------------------------------------------------------
@pytest.mark.vm
@needs_v2
@pytest.mark.parametrize("where", ["own", "parent"])
@pytest.mark.parametrize("backend", ["poll", pytest.param("ebpf", marks=needs_bpf)])
def test_memory_high_below_the_threshold_trips_before_usage_reaches_it(backend: str, where: str) -> None:
    high = 96 * MiB
    with make_cgroup(limit=256 * MiB) as parent, contextlib.ExitStack() as stack:
        # v2 keeps processes out of a cgroup that hands the controller to children: a child only for "parent"
        cg = parent if where == "own" else stack.enter_context(make_cgroup(parent=parent))
        _write(parent, "memory.high", str(high))
        holder = cg.hold()
        with Limiter(cg.directory, backend=backend, threshold=0.9, metric="usage", relief=False) as lim:
            s = lim.stats()
            assert (s.limit_bytes, s.high_bytes, s.binding, s.high_source) == (256 * MiB, high, "high",
                                                                               parent.directory)
            assert s.threshold_bytes == high * 9 // 10  # of memory.max it would be 230 MiB
            assert not lim.is_mem_limit_reached()
            tripped_at = None
            for _ in range(80):
                holder.change(2)
                if wait_until(lim.is_mem_limit_reached, timeout=0.05):
                    tripped_at = cg.usage()
                    break
            assert tripped_at is not None, f"never tripped; usage {cg.usage() // MiB} MiB"
            assert tripped_at < high, (tripped_at // MiB, high // MiB)
            assert _events(parent)["high"] == 0  # tripped before the kernel ever throttled the cgroup
            s = lim.stats()
            assert s.tripped and s.binding == "high" and s.limit_headroom_bytes is not None
            assert s.limit_headroom_bytes > 256 * MiB - high  # the OOM room stays the room to memory.max
            _write(parent, "memory.high", "max")  # the ceiling goes back to memory.max: clears
            assert wait_until(lambda: not lim.is_mem_limit_reached(), timeout=5)
            s = lim.stats()
            assert (s.high_bytes, s.binding, s.threshold_bytes) == (None, "max", 256 * MiB * 9 // 10)


@pytest.mark.vm
@needs_bpf
def test_a_ceiling_lowered_on_an_idle_cgroup_is_seen_without_relief() -> None:
    """Nothing charges after the write, so no event carries it: the Limiter's monitor looks at the
    files every second. It used to run only for relief, callbacks or the upkeep: a relief=False
    Limiter on a kernel with memcg events never saw it (memory.high on v2, the limit on v1)."""
    with make_cgroup(limit=256 * MiB) as cg:
        holder = cg.hold()
        holder.change(40)
        with Limiter(cg.directory, backend="ebpf", threshold=0.5, metric="usage", relief=False) as lim:
            assert not lim.is_mem_limit_reached()
            if cg.version == 2:
                _write(cg, "memory.high", str(64 * MiB))
            else:
                cg.set_limit(64 * MiB)
            assert wait_until(lim.is_mem_limit_reached, timeout=3)  # 40 MiB > half of 64
            s = lim.stats()
            assert (s.binding, s.threshold_bytes) == ("high" if cg.version == 2 else "max", 32 * MiB)


# -- memory pressure ---------------------------------------------------------------------------------
# Writes a file of ``mib`` MiB at ``path`` (so its page cache is charged to this cgroup; synced
# as it goes, so reclaim never waits on dirty pages), holds 16 MiB of anonymous memory, says
# "ready", then three threads read the file over and over until killed, each chunk twice (the
# second read activates its pages, as a working set's are). Where the file fits in the cgroup,
# every pass is served from the cache and nothing stalls. Where the working set (the anonymous
# memory, the interpreter and the file) is larger than the cgroup's memory.high, every read
# charges, reclaims and is throttled, and refaults what the last pass evicted: the kernel counts
# all of it as memory stall, the crawl of a service under a MemoryHigh= it outgrew.
READER = """
import mmap, os, sys, threading
path, mib = sys.argv[1], int(sys.argv[2])
chunk = os.urandom(1 << 20)
with open(path, "wb") as f:
    for i in range(mib):
        f.write(chunk)
        if i % 4 == 3:
            f.flush()
            os.fsync(f.fileno())
    f.flush()
    os.fsync(f.fileno())
held = mmap.mmap(-1, 16 << 20)
held[::4096] = b"\\x01" * (len(held) // 4096)
print("ready", flush=True)
fd = os.open(path, os.O_RDONLY)


def passes(start):
    buf = bytearray(1 << 20)
    while True:
        for i in range(mib):
            off = ((start + i) % mib) << 20
            os.preadv(fd, [buf], off)
            os.preadv(fd, [buf], off)


for n in range(1, 3):  # three readers at different places: "some" stall is any of them waiting
    threading.Thread(target=passes, args=(n * mib // 3,), daemon=True).start()
passes(0)
"""
THRASH_SECONDS = 13.0  # avg10 is a 10 s average renewed every 2 s: most of the way there


def _scratch_dir() -> str:
    # A disk-backed filesystem (in the VM: the repository's 9p share, cached there): tmpfs pages
    # are shmem, which without swap cannot be evicted and so cannot thrash.
    base = os.path.join(REPO, "build")
    return tempfile.mkdtemp(prefix="rtml-psi-", dir=base if os.path.isdir(base) else REPO)


def _pinned_flags(pin_dir: str) -> dict[int, int]:
    """cgroup id -> the flags word of its slot, read from the agent's pinned slots map (the VM has
    no loopback network for /metrics; the slot is where the agent writes the bit anyway)."""
    import ctypes
    import mmap

    from rtml_ebpf.ebpf import libbpf as _libbpf

    fd = _libbpf.lib().bpf_obj_get(os.path.join(pin_dir, "maps", "slots").encode())
    assert fd >= 0, f"no pinned slots map under {pin_dir}"
    try:
        entries = _libbpf.map_info(fd)[4]
        size = entries * ctypes.sizeof(abi.Slot)
        mm = mmap.mmap(fd, (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE, mmap.MAP_SHARED,
                       mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        slots = [abi.Slot.from_buffer_copy(mm[i * ctypes.sizeof(abi.Slot):(i + 1) * ctypes.sizeof(abi.Slot)])
                 for i in range(entries)]
    finally:
        mm.close()
    return {int(s.cgroup_id): int(s.flags) for s in slots if s.cgroup_id}


@pytest.mark.vm
@needs_v2
@needs_bpf
def test_a_thrashing_cgroup_stalls_and_a_cache_heavy_one_does_not() -> None:
    from support.agent import AgentProcess

    scratch = _scratch_dir()
    pin_dir = f"/sys/fs/bpf/rtml-test-{uuid.uuid4().hex[:8]}"
    try:
        with make_cgroup() as top, make_cgroup(limit=160 * MiB, parent=top) as cache, \
                make_cgroup(limit=64 * MiB, parent=top) as thrash:
            _write(cache, "memory.high", str(150 * MiB))  # set, binding nothing: /metrics shows it
            agent = AgentProcess(_cgroup.cgroup_from_directory(top.directory).path.rstrip("/") + "/*",
                                 pin_dir=pin_dir)
            try:
                readers = [cg.popen([sys.executable, "-c", READER, os.path.join(scratch, name), "48"])
                           for cg, name in ((cache, "cache"), (thrash, "thrash"))]
                for r in readers:
                    assert r.stdout is not None and r.stdout.readline().strip() == "ready", r.stderr
                _write(thrash, "memory.high", str(20 * MiB))  # after the file is written: below the working set
                # an absolute threshold far above both: shed_at="stall" must shed on the stall alone
                lims = [Limiter(cg.directory, backend="poll", threshold=1 << 30, relief=False)
                        for cg in (cache, thrash)]
                time.sleep(THRASH_SECONDS)
                seen = [False, False]
                t0 = time.monotonic()
                while time.monotonic() - t0 < 2.0:  # the Limiter's own reading: a second of totals
                    seen = [was or lim.stalling() for was, lim in zip(seen, lims, strict=True)]
                    time.sleep(0.05)
                cache_s, thrash_s = (lim.stats() for lim in lims)
                assert not lims[1].is_mem_limit_reached()
                policy = Policy("test", lims[1], shed_at="stall", admission=False)
                shed = wait_until(policy.door, timeout=3)
                flags = _pinned_flags(pin_dir)
                for lim in lims:
                    lim.close()
            finally:
                agent.stop()
                subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "agent", "--unload", "--pin-dir", pin_dir],
                               capture_output=True, timeout=60, cwd=REPO)
            events = _events(thrash)
            assert events.get("oom_kill", 0) == 0, events
            report = (f"cache: {cache_s.pressure_some_avg10}% some avg10, {cache_s.pressure_some_total_us} us, "
                      f"usage {cache_s.usage_bytes // MiB} MiB; thrash: {thrash_s.pressure_some_avg10}%, "
                      f"{thrash_s.pressure_some_total_us} us, usage {thrash_s.usage_bytes // MiB} MiB")
            assert cache_s.pressure_reason is None and thrash_s.pressure_reason is None, report
            assert cache_s.pressure_some_avg10 is not None and thrash_s.pressure_some_avg10 is not None, report
            assert cache_s.pressure_some_total_us is not None and thrash_s.pressure_some_total_us is not None
            assert cache_s.pressure_some_avg10 < 2.0, report  # a full cache of a file that fits: no stall
            assert thrash_s.pressure_some_avg10 >= 10.0, report  # reclaimed, throttled, refaulting
            assert thrash_s.pressure_some_total_us > 10 * max(cache_s.pressure_some_total_us, 100_000), report
            assert seen == [False, True] and thrash_s.stalling and not cache_s.stalling, (seen, report)
            assert shed, "shed_at='stall' did not shed while the cgroup thrashed"
            assert (thrash_s.high_bytes, thrash_s.binding) == (20 * MiB, "high")
            # the agent: its PSI trigger fired for the thrashing cgroup only (the bit in its slot)
            stall = abi.SLOT_STALLING
            thrash_id, cache_id = os.stat(thrash.directory).st_ino, os.stat(cache.directory).st_ino
            assert flags.get(thrash_id, 0) & stall and not flags.get(cache_id, 0) & stall, (
                flags, thrash_id, cache_id, agent.text()[-2000:])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- the agent's PSI trigger, on the kernel's system-wide file (every host has it) ----------------------
def test_the_agent_trigger_fires_on_a_stall_and_sets_the_slot_bit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """PsiTriggers against a real trigger: /proc/pressure/memory stands in for a cgroup's
    memory.pressure (same format, same trigger interface), so this runs on the v1 host too; the
    thrash is a real one in a 64 MiB cgroup. The slots and the publish program are stand-ins:
    the VM test above reads the bit from the agent's pinned slots."""
    import ctypes
    from types import SimpleNamespace

    from rtml_ebpf.agent.psi import PsiTriggers

    if not os.path.exists("/proc/pressure/memory"):
        pytest.fail("this kernel has no PSI (/proc/pressure/memory): boot with psi=1")
    fake = tmp_path / "cg"
    fake.mkdir()
    (fake / "memory.pressure").symlink_to("/proc/pressure/memory")
    cg = _cgroup.MemoryCgroup(2, "/cg", str(fake), _cgroup.Mount(2, "/", str(tmp_path), frozenset()))
    words = memoryview(bytearray(2 * ctypes.sizeof(abi.Slot))).cast("q")
    state = SimpleNamespace(index=1, cgroup=cg)
    published: list[int] = []
    slots = SimpleNamespace(by_cgid={7: state}, words=words)
    node = SimpleNamespace(publish=published.append)
    psi = PsiTriggers(slots, node)  # type: ignore[arg-type]
    scratch = _scratch_dir()
    try:
        psi.sync(slots.by_cgid)  # type: ignore[arg-type]
        assert list(psi.fds) == [7] and not psi.failed, psi.failed
        flag_at = 1 * abi.SLOT_WORDS + abi.W_FLAGS
        with make_cgroup(limit=64 * MiB) as thrash:
            r = thrash.popen([sys.executable, "-c", READER, os.path.join(scratch, "f"), "48"])
            assert r.stdout is not None and r.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 20
            while not words[flag_at] & abi.SLOT_STALLING and time.monotonic() < deadline:
                psi.read(time.monotonic())  # as the agent's loop does at every step
                time.sleep(0.1)
        assert words[flag_at] & abi.SLOT_STALLING and psi.fired >= 1 and published == [1], (psi.fired, published)
        time.sleep(max(psi.hold.values()) + 0.1)  # no more stall: the bit clears after its hold
        psi.expire(time.monotonic())
        assert not words[flag_at] & abi.SLOT_STALLING and published == [1, 1]
        psi.sync({})  # unwatched: disarmed
        assert psi.fds == {}
    finally:
        psi.close()
        shutil.rmtree(scratch, ignore_errors=True)
