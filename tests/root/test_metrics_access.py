"""Who may read the agent's /metrics (every cgroup's figures): root over loopback, or whoever
holds the token; uid 65534 on the same host is refused, and an address beyond loopback is not
served without a token."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from support.agent import NOBODY, REPO, AgentProcess, client_env, glob_for, nobody_python
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

FETCH = """
import sys, urllib.request, urllib.error
auth = {"Authorization": "Bearer " + sys.argv[2]} if len(sys.argv) > 2 else {}
req = urllib.request.Request(sys.argv[1], headers=auth)
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(r.status, r.read().decode().count("rtml_cgroup_usage_bytes{"))
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode().strip())
"""


def fetch_as_nobody(url: str, *token: str) -> str:
    out = subprocess.run([*NOBODY, nobody_python(), "-c", FETCH, url, *token], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_without_a_token_only_root_on_loopback_reads_the_metrics() -> None:
    with make_cgroup(limit=64 * MiB) as cg:
        agent = AgentProcess(glob_for(cg))
        try:
            as_root = agent.scrape()
            as_nobody = fetch_as_nobody(agent.metrics_url())
            watch_nobody = subprocess.run([*NOBODY, nobody_python(), "-m", "rtml_ebpf.cli", "watch", "--agent",
                                           agent.metrics_url(), "--once"], capture_output=True, text=True,
                                          timeout=60, env=client_env(agent))
        finally:
            agent.stop()
    assert "rtml_cgroup_usage_bytes{" in as_root
    assert as_nobody.startswith("403") and "uid: 65534" in as_nobody and "rtml_cgroup" not in as_nobody, as_nobody
    assert watch_nobody.returncode == 4 and "403" in watch_nobody.stderr and "Traceback" not in watch_nobody.stderr


def test_with_a_token_anyone_who_sends_it_reads_and_no_one_else(tmp_path) -> None:
    token = os.urandom(16).hex()
    secret = tmp_path / "token"
    secret.write_text(token + "\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)  # uid 65534 sends it in this test; a real one is 0600 or a Secret
    with make_cgroup(limit=64 * MiB) as cg:
        agent = AgentProcess(glob_for(cg), extra=("--metrics-addr", "0.0.0.0:0", "--metrics-token-file", str(secret)))
        try:
            url = agent.metrics_url()
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url, timeout=10)
            nobody_with = fetch_as_nobody(url, token)
            nobody_wrong = fetch_as_nobody(url, token[:-1] + "x")
            watch = subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "watch", "--agent", url, "--token-file",
                                    str(secret), "--once", "--json"], cwd=REPO, capture_output=True, text=True,
                                   timeout=60)
        finally:
            agent.stop()
    assert refused.value.code == 401  # root without the token too: the token is the rule here
    assert nobody_with == "200 1", nobody_with
    assert nobody_wrong.startswith("401"), nobody_wrong
    assert watch.returncode == 0 and os.path.basename(cg.directory) in watch.stdout, watch.stderr


def test_beyond_loopback_without_a_token_is_not_served() -> None:
    with make_cgroup(limit=64 * MiB) as cg:
        agent = AgentProcess(glob_for(cg), extra=("--metrics-addr", "0.0.0.0:0"))
        try:
            text = agent.text()
        finally:
            agent.stop()
    assert "no metrics endpoint" in text and "--metrics-token-file" in text and "metrics at" not in text
