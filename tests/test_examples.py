"""The README's runnable examples run (as root they use the eBPF backend, else poll)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(("name", "expect"), [("asgi_app.py", "200 processed 0 bytes"),
                                              ("wsgi_app.py", "200 processed"),
                                              ("grpc_server.py", "pong"),
                                              ("callbacks.py", "level: ")])
def test_example_runs(name: str, expect: str) -> None:
    out = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout
