"""Kubernetes names in a cgroup path: pod UID, container ID, QoS class and runtime.

kubelet lays pods out in one of two ways, by its cgroup driver:

- systemd: ``/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/
  cri-containerd-<id>.scope`` (the pod UID's dashes written as underscores; ``crio-<id>.scope``
  for CRI-O, ``docker-<id>.scope`` for dockershim/cri-dockerd; Guaranteed pods sit directly under
  ``kubepods.slice`` as ``kubepods-pod<uid>.slice``)
- cgroupfs: ``/kubepods/burstable/pod<uid>/<id>`` (Guaranteed: ``/kubepods/pod<uid>/<id>``); the
  runtime is not in the path there.

Used for the agent's "pod" scope and for labels. Pure string work: no file is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
POD_DIR = re.compile(rf"^(?:kubepods(?:-(burstable|besteffort))?-)?pod({_UID})(?:\.slice)?$")
_SCOPE = re.compile(r"^(cri-containerd|crio|docker)-([0-9a-f]{12,64})\.scope$")
_BARE_ID = re.compile(r"^[0-9a-f]{64}$")
RUNTIMES = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker"}


@dataclass(frozen=True)
class PodLabels:
    pod_uid: str
    qos: str  # guaranteed, burstable or besteffort
    driver: str  # systemd or cgroupfs
    container_id: str | None = None  # None for the pod's own cgroup
    runtime: str | None = None  # containerd, cri-o, docker; None where the path does not say

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in (("pod_uid", self.pod_uid), ("qos", self.qos), ("driver", self.driver),
                                  ("container_id", self.container_id), ("runtime", self.runtime)) if v}


def pod_labels(path: str) -> PodLabels | None:
    """The kubelet names in ``path`` (a cgroup path or directory), or None outside a pod."""
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        m = POD_DIR.match(part)
        if m is None or not any(p.startswith("kubepods") for p in parts[:i + 1]):
            continue
        driver = "systemd" if part.endswith(".slice") else "cgroupfs"
        qos = m.group(1) or _cgroupfs_qos(parts[:i]) or "guaranteed"
        uid = m.group(2).replace("_", "-")
        container = runtime = None
        if i + 1 < len(parts):
            child = parts[i + 1]
            s = _SCOPE.match(child)
            if s is not None:
                runtime, container = RUNTIMES[s.group(1)], s.group(2)
            elif _BARE_ID.match(child):
                container = child
        return PodLabels(uid, qos, driver, container, runtime)
    return None


def _cgroupfs_qos(parents: list[str]) -> str | None:
    for p in reversed(parents):
        if p in ("burstable", "besteffort"):
            return p
        if p.startswith("kubepods-") and p.endswith(".slice"):
            name = p[len("kubepods-"):-len(".slice")]
            if name in ("burstable", "besteffort"):
                return name
    return None


def is_pod_dir(name: str) -> bool:
    """True for a kubelet pod cgroup's directory name (either driver)."""
    return POD_DIR.match(name) is not None
