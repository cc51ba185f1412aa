"""Fault matrix, the admission ledger (issue 21, items 3, 6, 8 and 13), with real processes,
a real second uid (65534) and a real tmpfs filled up. Each test fails on the code before it:
a planted file switched the shared budget off, a full filesystem ended in SIGBUS, a deleted
ledger split the budget silently, and ledger files were never removed."""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cgroups import IS_ROOT, MiB, wait_until

from rtml_ebpf import _private_dir
from rtml_ebpf.admission import ledger as _ledger
from rtml_ebpf.admission.ledger import CHECK_INTERVAL, Ledger
from rtml_ebpf.errors import ConfigError

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (a second uid plants files; tmpfs mounts)")
CGID = 91_000_000 + os.getpid()  # an id no real cgroup of this host has


@pytest.fixture
def places(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """Stand-ins for /run (root-only), /dev/shm and the temp dir (world-writable, sticky), so
    the planting never touches the host's shared directories."""
    base = Path(tempfile.mkdtemp(prefix="rtml-ledger-test-"))
    os.chmod(base, 0o755)  # uid 65534 reaches shm and tmp
    run, shm, tmp = base / "run", base / "shm", base / "tmp"
    for d, mode in ((run, 0o755), (shm, 0o1777), (tmp, 0o1777)):
        d.mkdir()
        os.chmod(d, mode)
    monkeypatch.delenv("RTML_LEDGER_DIR", raising=False)
    monkeypatch.setattr(_private_dir, "ROOT_PLACE", str(run))
    monkeypatch.setattr(_private_dir, "SHARED_PLACES", [str(shm)])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    _private_dir._warned.clear()
    try:
        yield {"run": run, "shm": shm, "tmp": tmp}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, "/bin/sh", "-c", script], capture_output=True, text=True, timeout=30)


def plant(kind: str, path: Path) -> None:
    """What uid 65534 leaves where a root service's ledger (or its directory) would go."""
    make = {"file": f"touch {path}", "symlink": f"ln -s /etc {path}", "dir": f"mkdir -m 777 {path}"}[kind]
    out = as_nobody(make)
    assert out.returncode == 0, out.stderr
    assert os.lstat(path).st_uid == 65534


def worker_reserving(mib: int, ready: int, directory: str | None = None) -> int:
    """A forked worker holding a reservation of ``mib`` MiB in the ledger until killed."""
    pid = os.fork()
    if pid == 0:
        try:
            ledger = Ledger(CGID, directory)
            ledger.lock()
            ledger.publish(mib * MiB, 1, 0)
            ledger.unlock()
            os.write(ready, b"x")
            while True:  # as the admission publisher thread does: keep the row current
                ledger.publish(mib * MiB, 1, 0)
                time.sleep(0.01)
        finally:
            os._exit(0)
    return pid


def others_reserved(ledger: Ledger) -> int:
    ledger.lock()
    try:
        return ledger.totals()[0]
    finally:
        ledger.unlock()


def shared_between_two_processes(directory: str | None = None) -> str:
    """A worker reserves 100 MiB; this process sees it. Returns the ledger's path."""
    r, w = os.pipe()
    pid = worker_reserving(100, w, directory)
    try:
        os.read(r, 1)
        mine = Ledger(CGID, directory)
        assert others_reserved(mine) == 100 * MiB, "the budget is not shared"
        path = mine.path
        mine.close()
        return path
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# -- item 3: a ledger another uid can plant --------------------------------------------------------
@needs_root
@pytest.mark.root
@pytest.mark.parametrize("kind", ["file", "symlink", "dir"])
def test_3_plants_by_another_uid_leave_a_root_service_its_shared_budget(places: dict[str, Path], kind: str) -> None:
    # where the ledger used to go (the old predictable name) and where a private dir would go
    plant(kind, places["shm"] / f"rtml-ebpf-0-{CGID}.ledger")
    plant(kind, places["shm"] / "rtml-ebpf-0")
    # /run is root-only: uid 65534 cannot plant there at all
    refused = as_nobody(f"mkdir {places['run']}/rtml-ebpf-ledger")
    assert refused.returncode != 0
    path = shared_between_two_processes()
    assert path.startswith(str(places["run"])), path
    d = os.stat(os.path.dirname(path))
    assert d.st_uid == 0 and stat.S_IMODE(d.st_mode) == 0o700


@needs_root
@pytest.mark.root
@pytest.mark.parametrize("kind", ["file", "symlink", "dir"])
def test_3_a_squatted_shared_place_is_refused_loudly_and_the_next_one_shared(
        places: dict[str, Path], kind: str, caplog: pytest.LogCaptureFixture) -> None:
    os.rmdir(places["run"])  # a container with a read-only root: no /run to write
    plant(kind, places["shm"] / "rtml-ebpf-0")
    with caplog.at_level(logging.ERROR, logger="rtml_ebpf"):
        path = shared_between_two_processes()
    assert path.startswith(str(places["tmp"] / "rtml-ebpf-0")), path
    squat = str(places["shm"] / "rtml-ebpf-0")
    assert any(squat in r.getMessage() and "refusing" in r.getMessage() for r in caplog.records), caplog.text


@needs_root
@pytest.mark.root
def test_3_every_place_squatted_is_a_loud_error_and_admission_budgets_alone(
        places: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    from rtml_ebpf import Admission, Limiter

    os.rmdir(places["run"])
    plant("dir", places["shm"] / "rtml-ebpf-0")
    plant("symlink", places["tmp"] / "rtml-ebpf-0")
    with pytest.raises(ConfigError, match="no safe place.*uid 65534"):
        Ledger(CGID).open()
    with caplog.at_level(logging.ERROR, logger="rtml_ebpf"), \
            Limiter(backend="poll", relief=False, threshold=1.0, metric="usage") as lim:
        adm = Admission(lim, request_bytes=MiB)
        assert any("budgets alone" in r.getMessage() for r in caplog.records), caplog.text
        ticket = adm.try_admit("GET /")
        assert ticket is not None  # own budget: admitted, never a traceback
        assert adm.stats().inflight == 1  # counted in this process's own budget
        adm.finish(ticket)
        adm.close()


def test_3_the_ledger_directory_is_private_and_walked_without_following_links(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    os.symlink(target, shared / f"rtml-ebpf-{os.geteuid()}")
    with pytest.raises(ConfigError, match="symlink"):
        Ledger(7, str(shared)).open()
    os.unlink(shared / f"rtml-ebpf-{os.geteuid()}")
    ledger = Ledger(7, str(shared))
    ledger.open()
    assert stat.S_IMODE(os.stat(os.path.dirname(ledger.path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ledger.path).st_mode) == 0o600
    ledger.close()


# -- item 6: a full filesystem ---------------------------------------------------------------------
FULL_FS_SERVICE = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.ERROR)
    from rtml_ebpf import Admission, Limiter
    lim = Limiter(backend="poll", relief=False, threshold=1.0, metric="usage")
    adm = Admission(lim, request_bytes=1 << 20)
    for _ in range(20):                      # the first request faulted on the sparse file: SIGBUS
        t = adm.try_admit("GET /")
        assert t is not None
        adm.finish(t)
    print("served")
""")


@needs_root
@pytest.mark.root
def test_6_a_full_ledger_filesystem_is_an_error_at_start_not_sigbus(tmp_path: Path) -> None:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # fill it up: the next block cannot be had
            while os.write(fd, b"\1" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        env = {**os.environ, "RTML_LEDGER_DIR": str(mnt)}
        out = subprocess.run([sys.executable, "-c", FULL_FS_SERVICE], capture_output=True, text=True,
                             timeout=60, env=env)
        assert out.returncode == 0, f"rc {out.returncode}: {out.stderr[-2000:]}"
        assert "served" in out.stdout
        assert "cannot allocate" in out.stderr and "budgets alone" in out.stderr, out.stderr
        assert out.stderr.count("budgets alone") == 1, out.stderr  # said once, not per request
        assert "Traceback" not in out.stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- item 8: a deleted ledger -----------------------------------------------------------------------
def test_8_a_deleted_ledger_is_noticed_and_the_budget_stays_whole(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    r, w = os.pipe()
    log_r, log_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # process A: holds 100 MiB, logs to the pipe
        try:
            handler = logging.StreamHandler(os.fdopen(log_w, "w", buffering=1))
            logging.getLogger("rtml_ebpf").addHandler(handler)
            ledger = Ledger(CGID, str(tmp_path))
            ledger.lock()
            ledger.publish(100 * MiB, 1, 0)
            ledger.unlock()
            os.write(w, b"x")
            while True:
                ledger.publish(100 * MiB, 1, 0)
                time.sleep(0.01)
        finally:
            os._exit(0)
    try:
        os.read(r, 1)
        b = Ledger(CGID, str(tmp_path))
        assert others_reserved(b) == 100 * MiB
        os.unlink(b.path)  # rm
        seen = wait_until(lambda: others_reserved(b) == 100 * MiB and os.path.exists(b.path),
                          timeout=4 * CHECK_INTERVAL + 1)
        assert seen, f"after rm, B sees {others_reserved(b)} reserved"
        files = [p for p in os.listdir(tmp_path) if p.endswith(".ledger")]
        assert files == [f"{CGID}.ledger"], files
        # A notices on its own cadence (its next check, at most CHECK_INTERVAL after B's): read
        # its log until the line is there or that time is up.
        said = ""
        deadline = time.monotonic() + 4 * CHECK_INTERVAL + 1
        while not ("was deleted" in said and "re-published" in said) and time.monotonic() < deadline:
            ready, _, _ = select.select([log_r], [], [], 0.1)
            if ready:
                said += os.read(log_r, 65536).decode()
        assert "was deleted" in said and "re-published" in said, said
        b.close()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# -- item 13: ledger files removed by the last process out ---------------------------------------
WORKERS = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from rtml_ebpf import Admission, Limiter

    def serve(n):
        lim = Limiter(backend="poll", relief=False, threshold=1.0, metric="usage")
        adm = Admission(lim, request_bytes=1 << 20)
        for _ in range(n):
            adm.finish(adm.try_admit("GET /"))
        time.sleep(0.3)

    if __name__ == "__main__":
        how = sys.argv[1]
        if how == "fork":                    # gunicorn pre-fork: forked workers, sys.exit at the end
            pids = []
            for _ in range(4):
                pid = os.fork()
                if pid == 0:
                    serve(50)
                    sys.exit(0)
                pids.append(pid)
            victim = pids[0]
            time.sleep(0.1)
            os.kill(victim, 9)               # one worker OOM-killed: it cannot remove anything
            for pid in pids:
                os.waitpid(pid, 0)
        else:                                # uvicorn --workers: multiprocessing (spawn) children
            ctx = multiprocessing.get_context(how)
            procs = [ctx.Process(target=serve, args=(50,)) for _ in range(4)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
                assert p.exitcode == 0, p.exitcode
        print("done")
""")


@pytest.mark.parametrize("how", ["fork", "spawn", "forkserver"])
def test_13_no_ledger_file_is_left_after_a_run(tmp_path: Path, how: str) -> None:
    ledgers = tmp_path / "ledgers"
    ledgers.mkdir(mode=0o700)
    script = tmp_path / "workers.py"
    script.write_text(WORKERS)
    out = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RTML_LEDGER_DIR": str(ledgers)})
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]
    assert os.listdir(ledgers) == [], os.listdir(ledgers)


def test_13_the_last_process_out_removes_it_while_others_stay_it_stays(tmp_path: Path) -> None:
    first, second = Ledger(CGID, str(tmp_path)), Ledger(CGID, str(tmp_path))
    first.open()
    second.open()  # a second open file in this process: holds the file like another process
    path = first.path
    first.close()
    assert os.path.exists(path)  # another holder still uses it
    second.close()
    assert not os.path.exists(path)


def test_13_a_file_left_by_a_service_killed_whole_is_swept_by_the_next_join(tmp_path: Path) -> None:
    # A service's only process SIGKILLed (an OOM kill of the last worker): nothing removed its
    # file, named by a cgroup id that does not come back. The next process to join any ledger of
    # the directory removes it; a file a live process holds stays.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            Ledger(CGID + 1, str(tmp_path)).open()
            os.write(w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.read(r, 1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    dead = tmp_path / _ledger.file_name(CGID + 1)
    assert dead.exists()
    live = worker_reserving(8, w, str(tmp_path))
    try:
        os.read(r, 1)
        joining = Ledger(CGID + 2, str(tmp_path))
        joining.open()
        assert not dead.exists(), os.listdir(tmp_path)
        assert (tmp_path / _ledger.file_name(CGID)).exists()  # held by the live worker
        joining.close()
    finally:
        os.kill(live, signal.SIGKILL)
        os.waitpid(live, 0)


def test_read_totals_reads_a_ledger_without_joining_it(tmp_path: Path) -> None:
    r, w = os.pipe()
    pid = worker_reserving(64, w, str(tmp_path))
    try:
        os.read(r, 1)
        totals = _ledger.read_totals(CGID, str(tmp_path))
        assert totals is not None and totals.reserved == 64 * MiB and totals.inflight == 1
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert _ledger.read_totals(CGID + 1, str(tmp_path)) is None
