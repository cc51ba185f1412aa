"""Route estimates shared by a cgroup's processes beyond their lifetimes (adversarial review D9:
with gunicorn --max-requests every recycled worker started learning again, and a flooded service
served a tenth of what it served without recycling). Real files in a private directory, real
processes, a real (poll) limiter of this process's cgroup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rtml_ebpf.admission import ledger_files
from rtml_ebpf.admission.estimator import CostEstimator
from rtml_ebpf.admission.ledger import Ledger
from rtml_ebpf.admission.shared_routes import MAX_SAMPLES, SharedRoutes, file_name

MiB = 1 << 20
CGID = 93_000_000 + os.getpid()  # an id no real cgroup of this host has


def measured(routes: SharedRoutes, cgid: int, route: str, costs: list[int],
             sizes: list[int | None] | None = None) -> None:
    """What a process's finished requests do: note each cost, then the publisher publishes."""
    for cost, size in zip(costs, sizes or [None] * len(costs), strict=True):
        routes.note(route, cost, size)
    routes._published_at = 0.0  # now, not within PUBLISH_INTERVAL
    routes.publish(cgid)


def test_workers_that_each_measured_too_little_together_teach_the_next(tmp_path: Path) -> None:
    # gunicorn --max-requests under a flood: each worker is recycled after a measurement or two
    for _ in range(3):
        measured(SharedRoutes(str(tmp_path)), CGID, "GET /work", [24 * MiB])
    fresh = CostEstimator()
    assert fresh.estimate_for("GET /work") is None  # learning, as every recycled worker was
    assert SharedRoutes(str(tmp_path)).seed(CGID, fresh, "GET /work")
    got = fresh.estimate_for("GET /work")
    assert got is not None and got.bytes == 24 * MiB and got.basis == "route"
    assert not SharedRoutes(str(tmp_path)).seed(CGID, CostEstimator(), "GET /other")  # nobody measured it


def test_fewer_than_min_samples_teach_nothing_yet(tmp_path: Path) -> None:
    measured(SharedRoutes(str(tmp_path)), CGID, "GET /once", [8 * MiB, 8 * MiB])
    fresh = CostEstimator()
    assert not SharedRoutes(str(tmp_path)).seed(CGID, fresh, "GET /once")
    assert fresh.estimate_for("GET /once") is None


def test_size_classes_are_shared_too(tmp_path: Path) -> None:
    small, big = 64 << 10, 2 << 20
    measured(SharedRoutes(str(tmp_path)), CGID, "POST /up", [2 * MiB, 64 * MiB] * 4, [small, big] * 4)
    fresh = CostEstimator()
    assert SharedRoutes(str(tmp_path)).seed(CGID, fresh, "POST /up")
    for size, want in ((small, 2 * MiB), (big, 64 * MiB)):
        got = fresh.estimate_for("POST /up", size)
        assert got is not None and abs(got.bytes - want) <= want // 10, (size, got)


def test_the_file_keeps_the_most_recent_samples(tmp_path: Path) -> None:
    routes = SharedRoutes(str(tmp_path))
    measured(routes, CGID, "GET /w", [MiB] * MAX_SAMPLES)
    measured(routes, CGID, "GET /w", [5 * MiB] * 4)
    data = json.loads(next(tmp_path.rglob(file_name(CGID))).read_text())
    assert len(data["GET /w"]) == MAX_SAMPLES and data["GET /w"][-1] == [5 * MiB, 0]


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"GET /x": 5}', b'{"GET /x": [[1]]}',
                                     b'{"GET /x": [[-1, 0], [1, 0], [1, 0]]}', b'{"GET /x": [[true, 0]]}',
                                     b"\xff" * 10, b'{"GET /x": [[' + b"1" * 600_000 + b', 0]]}'])
def test_a_broken_file_is_ignored_never_raised(tmp_path: Path, content: bytes) -> None:
    measured(SharedRoutes(str(tmp_path)), CGID, "GET /y", [MiB] * 4)
    next(tmp_path.rglob(file_name(CGID))).write_bytes(content)
    assert not SharedRoutes(str(tmp_path)).seed(CGID, CostEstimator(), "GET /x")
    measured(SharedRoutes(str(tmp_path)), CGID, "GET /x", [MiB] * 3)  # and it is written over
    assert SharedRoutes(str(tmp_path)).seed(CGID, CostEstimator(), "GET /x")


def test_the_file_goes_with_the_ledger(tmp_path: Path) -> None:
    ledger = Ledger(CGID, str(tmp_path))
    ledger.open()
    measured(SharedRoutes(str(tmp_path)), CGID, "GET /work", [MiB] * 4)
    routes = Path(ledger.path).with_name(file_name(CGID))
    assert routes.exists()
    ledger.close()  # the last process out
    assert not routes.exists()
    # one left beside no ledger (its last process was killed) is swept by the next join
    measured(SharedRoutes(str(tmp_path)), CGID + 1, "GET /work", [MiB] * 4)
    orphan = routes.with_name(file_name(CGID + 1))
    assert orphan.exists()
    joining = Ledger(CGID + 2, str(tmp_path))
    joining.open()
    assert not orphan.exists()
    joining.close()
    assert ledger_files.BESIDE == (".routes",)


WORKER = textwrap.dedent("""
    import json, sys
    from rtml_ebpf import Admission, Limiter
    MiB = 1 << 20
    with Limiter(backend="poll", metric="usage", relief=False, threshold=0.99) as lim:
        adm = Admission(lim)
        bases = []
        for _ in range(int(sys.argv[1])):
            t = adm.try_admit("GET /work")
            bases.append(None if t is None else t.basis)
            if t is not None:
                buf = bytearray(8 * MiB)
                buf[::4096] = b"\\x01" * (8 * MiB // 4096)
                del buf
                adm.finish(t)
        adm._routes._published_at = 0.0  # publish now, not within PUBLISH_INTERVAL
        adm._publish()
        print(json.dumps(bases))
        sys.stdout.flush()
        sys.stdin.read()  # hold the ledger until told (workers overlap, as recycled ones do)
        adm.close()
""")


def test_recycled_workers_that_each_measured_one_request_leave_the_next_one_learned(tmp_path: Path) -> None:
    env = {**os.environ, "RTML_LEDGER_DIR": str(tmp_path)}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    holder = subprocess.Popen([sys.executable, str(script), "0"], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # keeps the ledger (and the file) alive
    try:
        assert holder.stdout is not None and json.loads(holder.stdout.readline()) == []
        for _ in range(3):  # each recycled after one request, before it had learned anything
            one = subprocess.run([sys.executable, str(script), "1"], env=env, input="", capture_output=True,
                                 text=True, timeout=60)
            assert one.returncode == 0, one.stderr[-2000:]
            assert json.loads(one.stdout.splitlines()[0]) == ["learning"], one.stdout
        last = subprocess.run([sys.executable, str(script), "1"], env=env, input="", capture_output=True,
                              text=True, timeout=60)
        assert last.returncode == 0, last.stderr[-2000:]
        assert json.loads(last.stdout.splitlines()[0]) == ["route"], last.stdout  # learned from the others
    finally:
        holder.communicate("", timeout=60)
