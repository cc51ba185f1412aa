"""A client's identity, from the kernel: SO_PEERCRED (pid, uid, gid as this pid namespace sees
them), SO_PEERPIDFD where the kernel has it (6.5+) so a reused pid is caught, and the memory
cgroup from /proc/<pid>/cgroup. Nothing the client sends decides any of it."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from dataclasses import dataclass

from .. import _cgroup
from .._kube import is_pod_dir
from ..errors import CgroupNotFound

SO_PEERPIDFD = 77  # Linux 6.5+
_CRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    pidfd: int  # -1 where the kernel has no SO_PEERPIDFD

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)


def peer_of(sock: socket.socket) -> Peer:
    """The peer's credentials. Only a kernel without SO_PEERPIDFD (ENOPROTOOPT, before 6.5)
    gives a peer without a pidfd; any other error (the peer exited and was reaped: its pid may
    be reused already) raises OSError, and the caller refuses the connection."""
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    try:
        pidfd = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise
        pidfd = -1
    return Peer(pid, uid, gid, pidfd)


def cgroup_key(peer: Peer) -> str:
    """The peer's cgroup membership as /proc/<pid>/cgroup says (the key of the per-cgroup
    connection cap: a file read, no waiting on the client). Empty when it cannot be read."""
    try:
        with open(f"/proc/{peer.pid}/cgroup", "rb") as f:
            text = f.read(65536).decode("utf-8", "replace")
    except OSError:
        return ""
    lines = text.splitlines()
    # the memory hierarchy's line (v1), else the unified one (v2)
    chosen = [ln for ln in lines if ln.split(":")[1:2] and "memory" in ln.split(":")[1].split(",")]
    chosen = chosen or [ln for ln in lines if ln.startswith("0::")]
    return chosen[0].split(":", 2)[2] if chosen else text


def alive(pidfd: int) -> bool:
    """The process behind the pidfd still runs (so its pid was not reused). Signal 0 checks
    existence; EPERM (an agent without CAP_KILL asking about another user) also means it runs."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(424, pidfd, 0, None, 0) == 0:  # pidfd_send_signal(fd, 0)
        return True
    return ctypes.get_errno() == 1


def cgroup_of(peer: Peer) -> _cgroup.MemoryCgroup:
    """The peer's memory cgroup. CgroupNotFound when it cannot be told for sure: a pid outside
    our pid namespace (0), an exited or reused pid."""
    if peer.pid <= 0:
        raise CgroupNotFound("the client's pid is not visible to the agent: run the agent in the host pid "
                             "namespace (hostPID: true)")
    cg = _cgroup.find_process_cgroup(peer.pid)
    if peer.pidfd >= 0 and not alive(peer.pidfd):
        raise CgroupNotFound(f"pid {peer.pid} exited while it was being identified")
    return cg


def pod_ancestor(cg: _cgroup.MemoryCgroup) -> _cgroup.MemoryCgroup:
    """The kubelet pod cgroup at or above ``cg`` (its containers share its limit)."""
    directory = cg.directory
    top = os.path.normpath(cg.mount.mount_point)
    while directory != top and directory.startswith(top + os.sep):
        if is_pod_dir(os.path.basename(directory)):
            return _cgroup.cgroup_from_directory(directory)
        directory = os.path.dirname(directory)
    raise CgroupNotFound(f"{cg.directory} is not inside a Kubernetes pod cgroup; ask for scope \"self\"")

