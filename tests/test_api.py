"""The public API's contract: arguments, errors, environment, the module-level check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from support.shared import shared_place

import rtml_ebpf
from rtml_ebpf import Limiter
from rtml_ebpf.limiter import parse_threshold_text

POLL = {"backend": "poll"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0.0}, r"threshold=0.0: a float threshold .* \(0, 1\]"),
        ({"threshold": 1.5}, r"threshold=1.5: .* \(0, 1\]"),
        ({"threshold": -0.5}, r"threshold=-0.5"),
        ({"threshold": float("nan")}, r"threshold=nan"),
        ({"threshold": -1}, r"threshold=-1: a byte threshold must be positive"),
        ({"threshold": 0}, r"threshold=0: a byte threshold must be positive"),
        ({"threshold": 1}, r"threshold=1 is read as 1 bytes.*1\.0"),
        ({"threshold": True}, r"threshold=True"),
        ({"threshold": "90%"}, r"threshold='90%': pass a float"),
        ({"metric": "rss"}, r"metric='rss': use one of 'working_set', 'usage'"),
        ({"backend": "bcc"}, r"backend='bcc': use one of 'auto', 'ebpf', 'agent', 'poll'"),
        ({"pid": -3}, r"pid=-3: pass a positive process id"),
        ({"pid": 1, "cgroup": "/sys/fs/cgroup"}, r"pass one of them, not both"),
        ({"poll_interval": -1}, r"poll_interval=-1"),
    ],
)
def test_bad_arguments_raise_value_error_naming_value_and_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limiter(**{**POLL, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cgroup": "/nonexistent/cgroup"}, r"no such directory"),
        ({"cgroup": "/tmp"}, r"outside every cgroup mount"),
        ({"cgroup": 42}, r"pass a cgroup directory path"),
        ({"pid": 999_999_999}, r"no such process"),
    ],
)
def test_bad_cgroups_raise_lookup_error(kwargs: dict, message: str) -> None:
    with pytest.raises(LookupError, match=message):
        Limiter(**{**POLL, **kwargs})


@pytest.mark.parametrize(
    ("text", "ppm", "nbytes"),
    [("0.9", 900_000, None), ("85%", 850_000, None), ("1", None, None), ("536870912", None, 536870912),
     ("512Mi", None, 512 << 20), ("1.5Gi", None, 3 << 29), ("2G", None, 2 * 10**9), ("64MiB", None, 64 << 20)],
)
def test_threshold_text(text: str, ppm: int | None, nbytes: int | None) -> None:
    if ppm is None and nbytes is None:
        with pytest.raises(ValueError, match="less than one page"):
            parse_threshold_text(text)
        return
    t = parse_threshold_text(text)
    assert (t.ppm, t.nbytes) == (ppm, nbytes)


def test_threshold_text_garbage() -> None:
    with pytest.raises(ValueError, match=r"RTML_THRESHOLD='lots': not a threshold"):
        parse_threshold_text("lots")


def test_limiter_poll_on_own_cgroup() -> None:
    with Limiter(backend="poll", threshold=0.5) as lim:
        assert lim.backend == "poll"
        assert lim.is_mem_limit_reached() in (True, False)
        s = lim.stats()
        assert s.backend == "poll" and s.backend_reason == "poll requested"
        assert s.usage_bytes > 0 and 0 <= s.working_set_bytes <= s.usage_bytes
        assert s.cgroup_id == os.stat(s.cgroup_dir).st_ino
        if s.limit_bytes is None:
            assert s.threshold_bytes is None and not s.tripped  # a fraction of "no limit" never trips
    assert lim.is_mem_limit_reached() is False  # closed: answers, never raises


def test_byte_threshold_trips_on_own_usage() -> None:
    with Limiter(backend="poll", threshold=4096, metric="usage") as lim:
        assert lim.is_mem_limit_reached() is True  # any process uses more than a page
        assert lim.stats().threshold_bytes == 4096
    with Limiter(backend="poll", threshold=1 << 50, metric="usage") as lim:
        assert lim.is_mem_limit_reached() is False


def test_check_never_raises_when_backend_breaks(caplog: pytest.LogCaptureFixture) -> None:
    lim = Limiter(backend="poll", threshold=4096, poll_interval=0)
    lim._backend.cgroup = lim._backend.cgroup.__class__(2, "/gone", "/nonexistent", lim.cgroup.mount)  # type: ignore[attr-defined]
    assert lim.is_mem_limit_reached() is False  # fail open by default
    assert lim.is_mem_limit_reached() is False
    assert sum("failed" in r.message for r in caplog.records) == 1  # logged once
    lim.close()
    closed = Limiter(backend="poll", threshold=4096, poll_interval=0, fail_closed=True)
    closed._backend.cgroup = lim._backend.cgroup  # type: ignore[attr-defined]
    assert closed.is_mem_limit_reached() is True
    closed.close()


def run_py(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_environment_sets_module_default() -> None:
    code = ("import json, rtml_ebpf; r = rtml_ebpf.is_mem_limit_reached(); s = rtml_ebpf.default_limiter().stats();"
            "print(json.dumps([r, s.backend, s.metric, s.threshold_bytes]))")
    out = run_py(code, {"RTML_BACKEND": "poll", "RTML_METRIC": "usage", "RTML_THRESHOLD": "64Ki"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [True, "poll", "usage", 65536]


def test_bad_environment_fails_open_and_logs_once() -> None:
    code = "import rtml_ebpf; print([rtml_ebpf.is_mem_limit_reached() for _ in range(3)])"
    out = run_py(code, {"RTML_BACKEND": "nope"})
    assert out.returncode == 0
    assert out.stdout.strip() == "[False, False, False]"
    assert out.stderr.count("RTML_BACKEND='nope'") == 1
    closed = run_py(code, {"RTML_THRESHOLD": "2.5", "RTML_FAIL_CLOSED": "1"})
    assert closed.stdout.strip() == "[True, True, True]"
    assert "RTML_THRESHOLD=2.5: a float threshold" in closed.stderr


def test_module_check_is_thread_safe_and_builds_one_default() -> None:
    rtml_ebpf.configure(backend="poll", threshold=1 << 50)
    try:
        results: list[bool] = []
        threads = [threading.Thread(target=lambda: results.extend(rtml_ebpf.is_mem_limit_reached()
                                                                 for _ in range(200))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [False] * 1600
        assert rtml_ebpf.default_limiter() is rtml_ebpf.default_limiter()
    finally:
        rtml_ebpf.configure(backend="auto", threshold=0.9)
        rtml_ebpf._default._settings.clear()


def test_first_call_answers_at_once_and_upgrades_in_the_background() -> None:
    code = ("import json, time, rtml_ebpf\n"
            "first = rtml_ebpf.is_mem_limit_reached(); answered_by = rtml_ebpf._default._default.backend\n"
            "lim = rtml_ebpf.default_limiter()\n"
            "print(json.dumps([first, answered_by, lim.backend, lim.stats().backend_reason]))")
    with shared_place() as place:
        out = run_py(code, {"RTML_METRIC": "usage", "RTML_THRESHOLD": "64Ki", **place.env})
    assert out.returncode == 0, out.stderr
    first, answered_by, backend, reason = json.loads(out.stdout)
    assert first is True and answered_by == "poll"  # answered by a poll limiter built on the spot
    if os.geteuid() == 0:
        # swapped in once ready: no node agent here, so the node's shared load (issue 20)
        assert backend == "agent" and "the node's shared load" in reason, reason
    else:
        assert backend == "poll" and "auto" in reason


def test_configure_validates() -> None:
    with pytest.raises(ValueError, match="metric='x'"):
        rtml_ebpf.configure(metric="x")


def test_a_kept_check_keeps_its_limiter_alive() -> None:
    import gc

    check = Limiter(backend="poll", threshold=4096, metric="usage").is_mem_limit_reached
    gc.collect()
    assert check() is True  # the Limiter behind it was not closed by the collector


def test_bad_hook_selection_names_the_choices() -> None:
    from rtml_ebpf.config import parse_hooks as hooks_from_env

    with pytest.raises(ValueError, match=r"RTML_HOOKS='memcg,nope': unknown hook 'memcg'.*page_fault_user"):
        hooks_from_env("memcg,nope")
    assert hooks_from_env("fault") == ("page_fault_user", "page_alloc", "oom_victim")
    assert hooks_from_env("") is None and hooks_from_env("auto") is None


def test_the_enforcers_exception_is_never_swallowed_by_the_never_raising_readings() -> None:
    # admission's enforcer ends a request by raising RequestMemoryExceeded in its thread at the
    # next bytecode; landing inside room()/level()/pressure()/the check, it must reach the request
    from rtml_ebpf.admission import follow
    from rtml_ebpf.errors import RequestMemoryExceeded

    with Limiter(backend="poll", relief=False, poll_interval=0.001) as lim:
        outcome: list[str] = []
        started = threading.Event()

        def request() -> None:
            started.set()
            deadline = time.monotonic() + 10
            try:
                while time.monotonic() < deadline:
                    lim.room(), lim.level(), lim.pressure(), lim.is_mem_limit_reached()
                outcome.append("ran on")
            except RequestMemoryExceeded:
                outcome.append("ended")

        t = threading.Thread(target=request)
        t.start()
        assert started.wait(5)
        time.sleep(0.05)
        assert t.ident is not None and follow.raise_in_thread(t.ident, RequestMemoryExceeded)
        t.join(15)
        assert outcome == ["ended"]
