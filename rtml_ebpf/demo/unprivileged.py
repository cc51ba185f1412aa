"""The demo's unprivileged part: the service as uid 65534 with no capabilities, guarded through
a node agent started for the row on a private socket."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from types import TracebackType

from ..errors import NotSupported
from .cgroups import stop_process
from .flood import Server

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all")


@functools.cache
def unprivileged_python() -> tuple[str, str]:
    """(python, PYTHONPATH) with which uid 65534 imports rtml_ebpf and gunicorn, or NotSupported."""
    import importlib.util

    import rtml_ebpf

    spec = importlib.util.find_spec("gunicorn")
    gunicorn_file = spec.origin if spec is not None and spec.origin else rtml_ebpf.__file__
    paths = [os.path.dirname(os.path.dirname(os.path.abspath(rtml_ebpf.__file__))),
             os.path.dirname(os.path.dirname(os.path.abspath(gunicorn_file))),
             *[p for p in sys.path if p.endswith("-packages")]]
    pythonpath = ":".join(dict.fromkeys(paths))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    tried = []
    for python in dict.fromkeys((sys.executable, shutil.which(version) or "", f"/usr/bin/{version}")):
        if not python or not os.path.exists(python):
            continue
        tried.append(python)
        out = subprocess.run([*NOBODY, python, "-c", "import rtml_ebpf, gunicorn"], capture_output=True, text=True,
                             env={"PYTHONPATH": pythonpath, "HOME": "/tmp", "PATH": os.environ.get("PATH", "")})
        if out.returncode == 0:
            return python, pythonpath
    raise NotSupported("the demo's unprivileged row",
                       f"uid 65534 cannot run {' or '.join(tried)} with rtml_ebpf and gunicorn from {pythonpath} "
                       "(a virtualenv under /root is private to root); install them where other users can read "
                       "them, or run --parts handler,prefork")


def unprivileged_server(guard: str, env: dict[str, str]) -> Server:
    python, pythonpath = unprivileged_python()
    argv = (*NOBODY, python, "-m", "gunicorn", "-b", "127.0.0.1:{port}", "-w", "4", "-k", "gthread",
            "--threads", "8", "--backlog", "256", "--graceful-timeout", "1", "-t", "60", "--log-level", "warning",
            "--preload", "rtml_ebpf.demo.app:wsgi")
    return Server(argv, tuple({**env, "RTML_DEMO_GUARD": guard, "PYTHONPATH": pythonpath, "HOME": "/tmp"}.items()))


class DemoAgent:
    """``rtml-ebpf agent`` on a private socket, unpinned: gone with the row."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="rtml-demo-agent-")
        os.chmod(self.dir, 0o755)  # uid 65534 connects
        self.socket = os.path.join(self.dir, "agent.sock")
        self.log = open(os.path.join(self.dir, "agent.log"), "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "rtml_ebpf.cli", "agent", "--socket", self.socket,
                                      "--no-pin", "--metrics-addr", "off"], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(os.path.join(self.dir, "agent.log")) as f:
                    raise NotSupported("the demo's node agent", f"it did not start:\n{f.read()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DemoAgent:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
