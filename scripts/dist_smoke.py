"""Smoke test of an installed wheel, as root, with no compiler on PATH (scripts/dist.sh runs it
with each fresh virtualenv's python, from outside the source tree):

    python scripts/dist_smoke.py

- the package comes from the virtualenv (not a source tree), its version is the metadata's;
- the C check (_hot, the abi3 module) and the shipped BPF object are the wheel's;
- `rtml-ebpf status --json --backend ebpf` answers through the eBPF backend;
- a Limiter(backend="ebpf") in a fresh memory cgroup (256 MiB) is the C Verdict, answers False,
  trips when the process allocates past its threshold and clears when it frees.
Exit 0 and a one-line summary, or exit 1 naming what failed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid

MiB = 1 << 20
LIMIT = 256 * MiB

CHILD = """
import json, sys, time
import rtml_ebpf
from rtml_ebpf._hot import Verdict

def wait(check, want):
    deadline = time.monotonic() + 5
    while check() is not want and time.monotonic() < deadline:
        time.sleep(0.01)
    return check()

with rtml_ebpf.Limiter(backend="ebpf", threshold=128 * 2**20, metric="usage", relief=False) as lim:
    check = lim.is_mem_limit_reached
    out = {"verdict_is_c": isinstance(check, Verdict), "at_start": check()}
    block = bytearray(160 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page: the kernel charges it
    out["after_160MiB"] = wait(check, True)
    del block
    out["after_free"] = wait(check, False)
print(json.dumps(out))
"""


def fail(msg: str) -> None:
    print(f"dist-smoke: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def run(argv: list[str]) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        fail(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


class ChildCgroup:
    """A memory cgroup under `parent` with a limit, removed on exit (v1 or v2)."""

    def __init__(self, parent: str, version: int) -> None:
        self.dir = os.path.join(parent, f"rtml-dist-{uuid.uuid4().hex[:8]}")
        self.version = version

    def __enter__(self) -> ChildCgroup:
        if self.version == 2:
            with open(os.path.join(os.path.dirname(self.dir), "cgroup.subtree_control"), "w") as f:
                f.write("+memory")
        os.mkdir(self.dir)
        limit_file = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        with open(os.path.join(self.dir, limit_file), "w") as f:
            f.write(str(LIMIT))
        return self

    def __exit__(self, *exc: object) -> None:
        for _ in range(50):  # the child's exit reaches the cgroup shortly after wait() returns
            try:
                os.rmdir(self.dir)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        print(f"dist-smoke: could not remove {self.dir}", file=sys.stderr)

    def run(self, argv: list[str]) -> str:
        procs = shlex.quote(os.path.join(self.dir, "cgroup.procs"))
        return run(["/bin/sh", "-c", f"echo $$ > {procs} && exec {shlex.join(argv)}"])


def main() -> None:
    if os.geteuid() != 0:
        fail("run as root: the Limiter check loads the BPF programs")
    compilers = [c for c in ("cc", "gcc", "clang", "c99", "x86_64-linux-gnu-gcc") if shutil.which(c)]
    if compilers:
        fail(f"a compiler is on PATH ({', '.join(compilers)}): this check is of an install that needs none")

    import importlib.metadata

    import rtml_ebpf
    from rtml_ebpf import _hot
    from rtml_ebpf.ebpf import loader

    prefix = os.path.realpath(sys.prefix)
    for what, path in (("rtml_ebpf", rtml_ebpf.__file__), ("_hot", _hot.__file__), ("BPF object", loader.OBJECT_PATH)):
        if not os.path.realpath(str(path)).startswith(prefix + os.sep):
            fail(f"{what} comes from {path}, not from the virtualenv {prefix}")
    if not str(_hot.__file__).endswith(".abi3.so"):
        fail(f"_hot is {_hot.__file__}, not the abi3 module")
    if not os.path.isfile(loader.OBJECT_PATH):
        fail(f"the wheel has no BPF object at {loader.OBJECT_PATH}")
    meta = importlib.metadata.version("rtml-ebpf")
    if meta != rtml_ebpf.__version__:
        fail(f"metadata version {meta} != rtml_ebpf.__version__ {rtml_ebpf.__version__}")

    cli = os.path.join(os.path.dirname(sys.executable), "rtml-ebpf")
    status = json.loads(run([cli, "status", "--json", "--backend", "ebpf"]))
    if status.get("backend") != "ebpf" or not status.get("hooks"):
        fail(f"status did not answer through the eBPF backend: {status}")

    with ChildCgroup(status["cgroup_dir"], status["cgroup_version"]) as cg:
        got = json.loads(cg.run([sys.executable, "-c", CHILD]).strip().splitlines()[-1])
    want = {"verdict_is_c": True, "at_start": False, "after_160MiB": True, "after_free": False}
    if got != want:
        fail(f"Limiter check in a {LIMIT // MiB} MiB cgroup, threshold 128 MiB: got {got}, want {want}")
    print(f"dist-smoke: ok: Python {sys.version.split()[0]}, rtml-ebpf {meta}, {os.path.basename(_hot.__file__)}, "
          f"status via {status['backend']} ({', '.join(status['hooks'])}), Limiter: C verdict, "
          "False -> True past 128 MiB -> False after free")


if __name__ == "__main__":
    main()
