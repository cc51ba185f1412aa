"""P4, start-up: the time to import rtml_ebpf and make the first eBPF Limiter (load, verify,
attach), and the RSS they add, in a fresh interpreter each time (children/startup.py); then the
first Limiter of a process that starts the node's shared load, and of processes that adopt it
(issue 20: ≤ 20 ms), each in a cgroup of its own, as root services are."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from benchmarks.common import child, med, spread

ADOPT_TARGET_S = 0.020


def p4_startup(reps: int) -> dict[str, Any]:
    runs = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, child("startup")], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout))
    res: dict[str, Any] = {k: {"median": med([r[k] for r in runs]), "spread": spread([r[k] for r in runs])}
                           for k in ("import_s", "limiter_s", "total_s", "rss_bytes")}
    res["shared"] = p4_shared(reps)
    return res


def _run_in_cgroup(env: dict[str, str]) -> dict[str, Any]:
    from benchmarks.cgroups import ChildCgroup

    with ChildCgroup(256 << 20, prefix="rtml-bench-p4") as cg:
        p = cg.popen([sys.executable, child("startup"), "auto"], env=env, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"P4 shared load: the child failed: {err[-2000:]}")
        r: dict[str, Any] = json.loads(out)
        if r["backend"] != "agent" or "shared load" not in r["reason"]:
            raise RuntimeError(f"P4 shared load: the child did not use the shared load: {r}")
        return r


def p4_shared(reps: int) -> dict[str, Any]:
    """The first Limiter (backend auto, no node agent) of the process that starts the shared load,
    then of ``reps`` processes that adopt it; on a private socket directory and pin directory."""
    from rtml_ebpf.backends import shared

    tmp = tempfile.mkdtemp(prefix="rtml-bench-p4-")
    os.chmod(tmp, 0o700)
    pin_dir = f"/sys/fs/bpf/rtml-bench-p4-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, shared.DIR_ENV: tmp, shared.PIN_ENV: pin_dir, shared.IDLE_ENV: "60",
           shared.SHARED_ENV: "1", "RTML_AGENT_SOCKET": os.path.join(tmp, "no-agent.sock")}
    try:
        first = _run_in_cgroup(env)  # spawns the shared agent, which stays for 60 s without clients
        adopters = [_run_in_cgroup(env)["limiter_s"] for _ in range(reps)]
    finally:
        for pid in shared.agent_pids(tmp):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while shared.agent_pids(tmp) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(pin_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"start_s": first["limiter_s"], "adopt_s": {"median": med(adopters), "spread": spread(adopters)},
            "target_s": ADOPT_TARGET_S}
