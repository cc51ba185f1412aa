"""pytest hooks only; shared helpers live in tests/support/."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


def _memory_cgroup_version() -> int | None:
    try:
        from rtml_ebpf import _cgroup

        return _cgroup.find_process_cgroup(require_accounting=False).version
    except Exception:  # noqa: BLE001 - no memory cgroup: the tests that need one say why
        return None


_DESELECTED: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of one cgroup version's files (markers cgroup_v1 / cgroup_v2) run where the memory
    controller is that version and are deselected elsewhere: cgroup v2 ones run in the VM
    (make vmtest), v1 ones on the v1 host. Deselected, not skipped, and counted in the summary."""
    version = _memory_cgroup_version()
    keep, drop = [], []
    for item in items:
        wants = 2 if item.get_closest_marker("cgroup_v2") else 1 if item.get_closest_marker("cgroup_v1") else None
        (drop if wants is not None and wants != version else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
        _DESELECTED.extend(item.nodeid for item in drop)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _DESELECTED:
        terminalreporter.write_line(f"{len(_DESELECTED)} tests of the other cgroup version's files deselected here "
                                    "(cgroup v2 ones run in make vmtest): " + ", ".join(_DESELECTED))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """RTML_NO_SKIP=1 (set inside the vmtest VM): a skipped test is a failure there."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("RTML_NO_SKIP") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped where every test must run (RTML_NO_SKIP=1): {report.longrepr}"


@pytest.fixture(scope="session", autouse=True)
def private_shared_load() -> Iterator[None]:
    """Root processes the tests start find no node agent and start the node's shared load on
    demand (rtml_ebpf/backends/shared.py): give this session a private socket directory and pin
    directory, inherited by every child, and remove the agents and pins it made at the end."""
    if os.geteuid() != 0 or os.environ.get("RTML_SHARED_DIR"):
        yield
        return
    from support.shared import SharedPlace

    place = SharedPlace(idle=5.0)
    saved = {k: os.environ.get(k) for k in place.env}
    os.environ.update(place.env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        place.close()
