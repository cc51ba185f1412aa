"""pytest hooks only; shared helpers live in tests/support/."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


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
    demand (rtml_ebpf/ebpf/shared.py): give this session a private socket directory and pin
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
