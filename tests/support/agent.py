"""A real node agent for the tests: ``rtml-ebpf agent`` as a root subprocess on a private socket,
and clients run as uid 65534 with no capabilities inside test cgroups."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rtml_ebpf.demo.cgroups import stop_process

from .cgroups import Cgroup, interpreter_for_nobody, wait_until

REPO = str(Path(__file__).resolve().parent.parent.parent)
CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent_client.py")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


class AgentProcess:
    """``rtml-ebpf agent`` watching only the cgroups under ``watch`` (a glob), on its own socket."""

    def __init__(self, watch: str | None, pin_dir: str | None = None, socket_dir: str | None = None,
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.dir = socket_dir or tempfile.mkdtemp(prefix="rtml-agent-")
        os.chmod(self.dir, 0o755)
        self.socket = os.path.join(self.dir, "agent.sock")
        self.log_path = os.path.join(self.dir, "agent.log")
        argv = [sys.executable, "-m", "rtml_ebpf.cli", "agent", "--socket", self.socket, "--metrics-addr",
                "127.0.0.1:0", *extra]
        argv += ["--pin-dir", pin_dir] if pin_dir else ["--no-pin"]
        if watch:
            argv += ["--watch", watch]
        self.log = open(self.log_path, "a")
        ready = self.text().count(f"serving {self.socket}") + 1  # a previous agent may have logged here
        # PYTHONFAULTHANDLER: an agent that does not start is asked where it is (SIGABRT) below
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})})
        # generous: inside the vmtest VM (software emulation) the import and load take seconds
        if not wait_until(lambda: self.text().count(f"serving {self.socket}") >= ready or self.proc.poll() is not None,
                          timeout=90):
            self.proc.send_signal(signal.SIGABRT)  # its threads' stacks go to the log
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self.stop()
            raise AssertionError(f"the agent did not start:\n{self.text()}")
        if self.proc.poll() is not None:
            raise AssertionError(f"the agent exited {self.proc.returncode}:\n{self.text()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def metrics_url(self) -> str:
        import re

        found = re.findall(r"metrics at (http://\S+/metrics)", self.text())
        assert found, f"no metrics endpoint in the agent's log:\n{self.text()}"
        return found[-1]

    def health_url(self, path: str = "/healthz") -> str:
        import re

        found = re.findall(r"health probes at (http://\S+?)/healthz", self.text())
        assert found, f"no health endpoint in the agent's log:\n{self.text()}"
        return found[-1] + path

    def probe(self, path: str, timeout: float = 5) -> tuple[int, str]:
        """(HTTP status, body) of a health endpoint; no token."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.health_url(path), timeout=timeout) as r:
                return int(r.status), str(r.read().decode())
        except urllib.error.HTTPError as e:
            return int(e.code), str(e.read().decode())

    def scrape(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.metrics_url(), timeout=10) as r:
            return str(r.read().decode())

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        rc = stop_process(self.proc)
        self.log.close()
        return rc


def nobody_python() -> str:
    return interpreter_for_nobody()


def client_env(agent: AgentProcess) -> dict[str, str]:
    paths = [REPO, *site.getsitepackages()]
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp", "PYTHONPATH": ":".join(paths),
            "RTML_AGENT_SOCKET": agent.socket}


def client_argv(mode: str, *args: object) -> list[str]:
    return [*NOBODY, nobody_python(), CLIENT, mode, *map(str, args)]


def start_client(cg: Cgroup, agent: AgentProcess, mode: str, *args: object) -> subprocess.Popen[str]:
    return cg.popen(client_argv(mode, *args), env=client_env(agent))


def run_client(cg: Cgroup, agent: AgentProcess, mode: str, *args: object, timeout: float = 60) -> dict:
    p = start_client(cg, agent, mode, *args)
    out, err = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"client exited {p.returncode}; stderr:\n{err[-3000:]}\n"
                             f"agent log:\n{agent.text()[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def glob_for(cg: Cgroup) -> str:
    """A --watch glob matching ``cg`` and its children only (paths from the hierarchy root)."""
    from rtml_ebpf import _cgroup

    return _cgroup.cgroup_from_directory(cg.directory).path.rstrip("/") + "*"


def settle() -> None:
    time.sleep(0.05)
