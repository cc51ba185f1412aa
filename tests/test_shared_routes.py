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
from rtml_ebpf.admission.shared_routes import SharedRoutes, file_name

MiB = 1 << 20
CGID = 93_000_000 + os.getpid()  # an id no real cgroup of this host has


def learned(route: str, costs: list[int], sizes: list[int | None] | None = None) -> CostEstimator:
    est = CostEstimator()
    for cost, size in zip(costs, sizes or [None] * len(costs), strict=True):
        est.observe(route, cost, size)
    return est


def test_a_fresh_estimator_starts_from_what_another_learned(tmp_path: Path) -> None:
    first = learned("GET /work", [24 * MiB] * 5)
    SharedRoutes(str(tmp_path)).publish(CGID, first.routes())
    fresh = CostEstimator()
    assert fresh.estimate_for("GET /work") is None  # learning, as every recycled worker was
    assert SharedRoutes(str(tmp_path)).seed(CGID, fresh, "GET /work")
    got = fresh.estimate_for("GET /work")
    assert got is not None and got.bytes == 24 * MiB and got.basis == "route"
    assert not SharedRoutes(str(tmp_path)).seed(CGID, CostEstimator(), "GET /other")  # nobody learned it


def test_size_classes_are_shared_too(tmp_path: Path) -> None:
    small, big = 64 << 10, 2 << 20
    first = learned("POST /up", [2 * MiB, 64 * MiB] * 4, [small, big] * 4)
    SharedRoutes(str(tmp_path)).publish(CGID, first.routes())
    fresh = CostEstimator()
    assert SharedRoutes(str(tmp_path)).seed(CGID, fresh, "POST /up")
    for size, want in ((small, 2 * MiB), (big, 64 * MiB)):
        got = fresh.estimate_for("POST /up", size)
        assert got is not None and abs(got.bytes - want) <= want // 10, (size, got)


def test_too_few_samples_and_declared_routes_are_not_shared(tmp_path: Path) -> None:
    routes = SharedRoutes(str(tmp_path))
    routes.publish(CGID, learned("GET /once", [8 * MiB]).routes())  # one sample: still learning
    routes.publish(CGID, CostEstimator(route_costs={"GET /d": MiB}).routes())
    assert not (tmp_path / file_name(CGID)).exists() or "GET /d" not in (tmp_path / file_name(CGID)).read_text()
    assert not SharedRoutes(str(tmp_path)).seed(CGID, CostEstimator(), "GET /once")


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"GET /x": 5}', b'{"GET /x": [1, 2]}',
                                     b'{"GET /x": [-1, 9, []]}', b'{"GET /x": [1, 9, [[1]]]}', b"\xff" * 10,
                                     b'{"GET /x": [' + b"1" * 300_000 + b', 9, []]}'])
def test_a_broken_file_is_ignored_never_raised(tmp_path: Path, content: bytes) -> None:
    SharedRoutes(str(tmp_path)).publish(CGID, learned("GET /y", [MiB] * 4).routes())
    next(tmp_path.rglob(file_name(CGID))).write_bytes(content)
    assert not SharedRoutes(str(tmp_path)).seed(CGID, CostEstimator(), "GET /x")


def test_the_file_goes_with_the_ledger(tmp_path: Path) -> None:
    ledger = Ledger(CGID, str(tmp_path))
    ledger.open()
    SharedRoutes(str(tmp_path)).publish(CGID, learned("GET /work", [MiB] * 4).routes())
    routes = Path(ledger.path).with_name(file_name(CGID))
    assert routes.exists()
    ledger.close()  # the last process out
    assert not routes.exists()
    # one left beside no ledger (its last process was killed) is swept by the next join
    SharedRoutes(str(tmp_path)).publish(CGID + 1, learned("GET /work", [MiB] * 4).routes())
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
        adm._routes._written_at = 0.0  # publish now, not within the second
        adm._publish()
        print(json.dumps(bases))
        sys.stdout.flush()
        sys.stdin.read()  # hold the ledger until told (a worker alive while the next starts)
        adm.close()
""")


def test_a_recycled_worker_starts_learned(tmp_path: Path) -> None:
    env = {**os.environ, "RTML_LEDGER_DIR": str(tmp_path)}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    first = subprocess.Popen([sys.executable, str(script), "5"], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        bases = json.loads(first.stdout.readline())
        assert bases[0] == "learning" and bases[-1] == "route", bases
        second = subprocess.run([sys.executable, str(script), "1"], env=env, input="", capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 0, second.stderr[-2000:]
        assert json.loads(second.stdout.splitlines()[0]) == ["route"], second.stdout  # not learning again
    finally:
        first.communicate("", timeout=60)
