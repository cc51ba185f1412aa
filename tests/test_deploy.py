"""The deployment files: Kubernetes manifests valid against the API schemas (offline), the
systemd unit accepted by systemd-analyze, and the properties the agent and its clients need."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
UNIT = ROOT / "deploy" / "systemd" / "rtml-ebpf-agent.service"
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
BIN = Path(sys.executable).parent


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def test_manifests_pass_the_kubernetes_schemas() -> None:
    out = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", *map(str, sorted(K8S.glob("*.yaml")))],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed") == 3, out.stdout


def test_manifests_pass_yamllint() -> None:
    config = "{extends: default, rules: {line-length: {max: 120}, document-start: disable}}"
    out = subprocess.run([str(BIN / "yamllint"), "-s", "-d", config, str(K8S)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_daemonset_has_what_the_agent_needs() -> None:
    ds = next(d for d in docs("agent-daemonset.yaml") if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True  # SO_PEERCRED pids of other pods must be visible
    agent = spec["containers"][0]
    assert agent["securityContext"]["privileged"] is True
    paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert paths == {"/sys/fs/bpf", "/sys/fs/cgroup", "/run/rtml-ebpf"}
    # metrics beyond loopback only behind a token, from a Secret the agent does not wait for
    args = agent["args"]
    assert args[args.index("--metrics-addr") + 1] == "0.0.0.0:9909"
    token_file = args[args.index("--metrics-token-file") + 1]
    secret = next(v for v in spec["volumes"] if "secret" in v)
    assert secret["secret"]["optional"] is True
    mount = next(m for m in agent["volumeMounts"] if m["name"] == secret["name"])
    assert token_file.startswith(mount["mountPath"] + "/") and mount["readOnly"] is True
    # the probes ask the agent itself, on the port that serves health without a token
    port = next(p for p in agent["ports"] if p["name"] == "metrics")
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert "httpHeaders" not in agent["livenessProbe"]["httpGet"]
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"  # pins reach the host's bpffs
    assert "/run/rtml-ebpf/agent.sock" in agent["args"]


def test_app_pod_is_unprivileged_and_mounts_only_the_socket_directory() -> None:
    (pod,) = docs("app-pod.yaml")
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"  # bpf() refused
    assert "hostPID" not in spec and "hostNetwork" not in spec
    (app,) = spec["containers"]
    sc = app["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("privileged", False)
    assert sc["allowPrivilegeEscalation"] is False
    host_paths = [v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v]
    assert host_paths == ["/run/rtml-ebpf"]
    assert app["resources"]["limits"]["memory"]  # a limit for the agent to guard


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    # verify checks that ExecStart's binary exists: point it at this checkout's
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/rtml-ebpf", str(BIN / "rtml-ebpf")))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                         env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    assert out.returncode == 0 and unit.name not in out.stderr, out.stderr
    text = UNIT.read_text()
    assert "RuntimeDirectory=rtml-ebpf" in text and "--socket /run/rtml-ebpf/agent.sock" in text
    # the agent notifies READY=1 and WATCHDOG=1 from its loop (rtml_ebpf/agent/notify.py)
    assert "Type=notify" in text and "NotifyAccess=main" in text
    assert int(text.split("WatchdogSec=")[1].split()[0]) >= 10


def test_containerfile_copies_what_exists_and_runs_the_cli() -> None:
    lines = [line.strip() for line in CONTAINERFILE.read_text().splitlines() if line.strip()
             and not line.startswith("#")]
    assert lines[0].startswith("FROM ")
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"{CONTAINERFILE.name}: {src} does not exist"
    assert 'ENTRYPOINT ["rtml-ebpf"]' in lines and 'CMD ["agent"]' in lines
