"""P8, precision per hook set: how long the verdict takes to clear after the cgroup frees its
memory, and the working-set error at rest (children/cache_reader.py fills the file cache)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import HOOK_SETS, WORKLOADS, MiB, child, med, spread


def p8_precision(reps: int, tmp: str) -> dict[str, Any]:
    """Per hook set: how long the verdict takes to clear after the cgroup frees its memory, and
    the working-set error at rest (stats() against usage - inactive_file from the files)."""
    import rtml_ebpf
    from benchmarks.cgroups import ChildCgroup, working_set_from_files

    data = os.path.join(tmp, "p8-cache.bin")
    with open(data, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(MiB))
    clear: dict[str, list[float]] = {h: [] for h in HOOK_SETS}
    ws_err: dict[str, list[float]] = {h: [] for h in HOOK_SETS}
    env_before = os.environ.get("RTML_HOOKS")
    try:
        for _ in range(reps):
            for hook_set, env in HOOK_SETS.items():
                os.environ["RTML_HOOKS"] = env
                with ChildCgroup(512 * MiB, prefix="rtml-bench") as cg:
                    hold = cg.popen([sys.executable, WORKLOADS, "hold"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    bufsize=1)
                    assert hold.stdin is not None and hold.stdout is not None
                    hold.stdout.readline()
                    with rtml_ebpf.Limiter(cg.directory, backend="ebpf", threshold=64 * MiB, metric="usage",
                                           relief=False) as lim:
                        hold.stdin.write("100\n")
                        hold.stdin.flush()
                        hold.stdout.readline()
                        deadline = time.monotonic() + 5
                        while not lim.is_mem_limit_reached() and time.monotonic() < deadline:
                            time.sleep(0.001)
                        hold.stdin.write("-100\n")
                        hold.stdin.flush()
                        hold.stdout.readline()
                        t0 = time.monotonic()
                        while lim.is_mem_limit_reached() and time.monotonic() - t0 < 5:
                            time.sleep(0.001)
                        clear[hook_set].append(time.monotonic() - t0)
                    hold.kill()
                    hold.wait()
                with open(data, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                with ChildCgroup(512 * MiB, prefix="rtml-bench") as cg:
                    with rtml_ebpf.Limiter(cg.directory, backend="ebpf", relief=False) as lim:
                        reader = cg.popen([sys.executable, child("cache_reader"), data], stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL)
                        assert reader.stdout is not None
                        reader.stdout.readline()
                        time.sleep(1.0)  # at rest
                        s = lim.stats()
                        truth = working_set_from_files(cg.directory)
                        ws_err[hook_set].append(abs(s.working_set_bytes - truth) / MiB)
                        reader.kill()
                        reader.wait()
    finally:
        os.unlink(data)
        if env_before is None:
            os.environ.pop("RTML_HOOKS", None)
        else:
            os.environ["RTML_HOOKS"] = env_before
    return {h: {"clear_ms": {"median": med(clear[h]) * 1e3, "spread": spread([x * 1e3 for x in clear[h]])},
                "ws_error_mib": {"median": med(ws_err[h]), "spread": spread(ws_err[h])}} for h in HOOK_SETS}
