"""Kubelet cgroup names, both drivers, three runtimes and the three QoS classes (fixture paths:
this machine runs no kubelet)."""

from __future__ import annotations

import pytest

from rtml_ebpf._kube import PodLabels, is_pod_dir, pod_labels

UID = "0f5e7a2c-3b1d-4e8f-9a6b-7c2d1e0f3a4b"
SYSTEMD_UID = UID.replace("-", "_")
CID = "4b825dc642cb6eb9a060e54bf8d69288fbee4904" + "a" * 24


@pytest.mark.parametrize(("path", "want"), [
    # systemd driver, cgroup v2, containerd / CRI-O / docker
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope",
     PodLabels(UID, "burstable", "systemd", CID, "containerd")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD_UID}.slice/crio-{CID}.scope",
     PodLabels(UID, "besteffort", "systemd", CID, "cri-o")),
    (f"/kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice/docker-{CID}.scope",
     PodLabels(UID, "guaranteed", "systemd", CID, "docker")),
    # the pod's own cgroup
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice",
     PodLabels(UID, "burstable", "systemd")),
    # cgroupfs driver (v1 memory hierarchy paths look the same)
    (f"/kubepods/burstable/pod{UID}/{CID}", PodLabels(UID, "burstable", "cgroupfs", CID)),
    (f"/kubepods/besteffort/pod{UID}/{CID}", PodLabels(UID, "besteffort", "cgroupfs", CID)),
    (f"/kubepods/pod{UID}/{CID}", PodLabels(UID, "guaranteed", "cgroupfs", CID)),
    (f"/sys/fs/cgroup/memory/kubepods/pod{UID}", PodLabels(UID, "guaranteed", "cgroupfs")),
])
def test_kubelet_paths_of_both_drivers(path: str, want: PodLabels) -> None:
    assert pod_labels(path) == want


@pytest.mark.parametrize("path", [
    "/", "/system.slice/containerd.service", "/user.slice/user-0.slice/session-1.scope",
    f"/somewhere/pod{UID}",  # a pod-like name outside kubepods
    "/kubepods.slice/kubepods-burstable.slice",  # a QoS slice, not a pod
])
def test_paths_outside_pods_have_no_labels(path: str) -> None:
    assert pod_labels(path) is None


def test_pod_directory_names() -> None:
    assert is_pod_dir(f"kubepods-burstable-pod{SYSTEMD_UID}.slice")
    assert is_pod_dir(f"pod{UID}")
    assert not is_pod_dir(f"cri-containerd-{CID}.scope")
    assert not is_pod_dir("kubepods-burstable.slice")


def test_labels_as_dict_leave_out_what_the_path_does_not_say() -> None:
    labels = pod_labels(f"/kubepods/pod{UID}/{CID}")
    assert labels is not None
    assert labels.as_dict() == {"pod_uid": UID, "qos": "guaranteed", "driver": "cgroupfs", "container_id": CID}
