"""Pins in a shared bpffs (issue 21 items 5 and 11): uid 65534 cannot plant a symlink or a
directory where the agent pins; bpffs is mounted 0700; a restart with another hook set says
what it does."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from support.agent import NOBODY, REPO, AgentProcess, glob_for
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups

pytestmark = [needs_bpf, needs_cgroups, pytest.mark.root]


def _agent(pin_dir: str, sock_dir: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "agent", "--socket", f"{sock_dir}/a.sock",
                           "--metrics-addr", "off", "--pin-dir", pin_dir, "--watch", "/nothing-here*", *extra],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.fixture
def shared():
    """A bpffs of our own mounted with bpffs's default mode 1777 (what an agent used to mount, and
    what anything else may have mounted): any user can make names in it."""
    top = f"/tmp/rtml-bpffs-{uuid.uuid4().hex[:8]}"
    os.mkdir(top, 0o755)
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=1777", "bpf", top], check=True, timeout=30)
    try:
        yield top
    finally:
        subprocess.run(["umount", "-l", top], check=False)
        os.rmdir(top)


@pytest.mark.parametrize("planted", ["symlink-new", "dir-new", "dir"])
def test_a_name_planted_by_another_user_is_refused_with_the_path_and_the_fix(shared, tmp_path, planted) -> None:
    pin_dir = f"{shared}/pins"
    evil = f"{shared}/evil"
    target = pin_dir + "-new" if planted.endswith("-new") else pin_dir
    plant = (f"import os; os.mkdir({evil!r}); os.symlink({evil!r}, {target!r})" if planted.startswith("symlink")
             else f"import os; os.mkdir({target!r})")
    subprocess.run([*NOBODY, sys.executable, "-c", plant], check=True, timeout=30)
    out = _agent(pin_dir, str(tmp_path))
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert target in text and "rm -rf" in text and "Traceback" not in text, text
    if os.path.isdir(evil):
        assert os.listdir(evil) == [], "nothing may be pinned into the planted directory"


def test_bpffs_is_mounted_0700_not_1777() -> None:
    code = ("import os, stat, subprocess\n"
            "subprocess.run(['umount', '-l', '/sys/fs/bpf'], capture_output=True)\n"
            "from rtml_ebpf.agent.programs import ensure_bpffs\n"
            "ensure_bpffs('/sys/fs/bpf/rtml-ebpf')\n"
            "print(oct(stat.S_IMODE(os.stat('/sys/fs/bpf').st_mode) & 0o777))\n")
    # a private mount namespace: the host's bpffs is left as it is
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0o700", out.stdout


def test_a_restart_with_another_hook_set_reloads_and_says_so() -> None:
    pin_dir = f"/sys/fs/bpf/rtml-test-{uuid.uuid4().hex[:8]}"
    with make_cgroup(limit=64 * MiB) as cg:
        first = AgentProcess(glob_for(cg), pin_dir=pin_dir, extra=("--hooks", "memcg"))
        try:
            first.kill9()
            lean = AgentProcess(glob_for(cg), pin_dir=pin_dir, socket_dir=first.dir, extra=("--hooks", "lean"))
            try:
                text = lean.text()
                assert "--hooks asks for oom_victim, page_alloc, page_fault_user" in text, text
                assert "loaded programs (page_fault_user, page_alloc, oom_victim" in text, text
                assert sorted(os.listdir(f"{pin_dir}/links")) == ["oom_victim", "page_alloc", "page_fault_user"]
                lean.kill9()
                again = AgentProcess(glob_for(cg), pin_dir=pin_dir, socket_dir=first.dir, extra=("--hooks", "lean"))
                again.stop()
                text = again.text()
                assert text.count("adopting the pinned programs") == 1, text  # only the last one adopted
                assert ("(hooks oom_victim, page_alloc, page_fault_user; "
                        "--hooks page_fault_user, page_alloc, oom_victim)") in text, text
            finally:
                lean.stop()
        finally:
            first.stop()
            subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "agent", "--unload", "--pin-dir", pin_dir],
                           check=True, capture_output=True, timeout=60)
