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
