"""The node's shared load (rtml_ebpf/backends/shared.py) on a private socket directory and pin
directory, and its removal: tests never touch the defaults (/run/rtml-ebpf-shared,
/sys/fs/bpf/rtml-ebpf-shared)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator

from rtml_ebpf.backends import shared


class SharedPlace:
    def __init__(self, idle: float = 2.0) -> None:
        self.dir = tempfile.mkdtemp(prefix="rtml-shared-")
        os.chmod(self.dir, 0o700)
        self.pin_dir = f"/sys/fs/bpf/rtml-test-shared-{uuid.uuid4().hex[:8]}"
        self.env = {shared.DIR_ENV: self.dir, shared.PIN_ENV: self.pin_dir, shared.IDLE_ENV: str(idle),
                    shared.SHARED_ENV: "1"}

    @property
    def socket(self) -> str:
        return os.path.join(self.dir, "agent.sock")

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "agent.log")) as f:
                return f.read()
        except OSError:
            return ""

    def agent_pids(self) -> list[int]:
        """Pids of shared agents serving this place."""
        return shared.agent_pids(self.dir)

    def close(self) -> None:
        for pid in self.agent_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.agent_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.pin_dir, ignore_errors=True)  # the programs detach with their last pin
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def shared_place(idle: float = 2.0) -> Iterator[SharedPlace]:
    place = SharedPlace(idle)
    try:
        yield place
    finally:
        place.close()
