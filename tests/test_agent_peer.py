"""peer_of (issue 21 item 10): without SO_PEERPIDFD support (ENOPROTOOPT, before 6.5) a peer
has no pidfd; any other error, such as a peer that exited and was reaped before the agent
looked (its pid may already be someone else's), refuses the peer instead of skipping the
liveness check. Real sockets, real processes."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from rtml_ebpf.agent.peer import SO_PEERPIDFD, cgroup_of, peer_of
from rtml_ebpf.errors import CgroupNotFound


def _pidfd_supported() -> bool:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        os.close(int.from_bytes(a.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4), "little"))
        return True
    except OSError as exc:
        assert exc.errno == errno.ENOPROTOOPT, exc
        return False
    finally:
        a.close()
        b.close()


def test_a_live_peer_has_a_pidfd_where_the_kernel_has_them() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        peer = peer_of(a)
        assert peer.pid == os.getpid() and peer.uid == os.getuid()
        assert (peer.pidfd >= 0) == _pidfd_supported()
        peer.close()
    finally:
        a.close()
        b.close()


def test_a_peer_that_exited_before_it_was_identified_is_refused(tmp_path) -> None:
    if not _pidfd_supported():
        pytest.skip("this kernel has no SO_PEERPIDFD (before 6.5): the fallback is the documented path")
    path = str(tmp_path / "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    pid = os.fork()
    if pid == 0:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        os._exit(0)  # gone before the agent accepts
    os.waitpid(pid, 0)  # reaped: its pid is free for reuse
    conn, _ = listener.accept()
    try:
        try:
            peer = peer_of(conn)
        except OSError as exc:  # kernels that refuse a pidfd for a reaped process
            assert exc.errno != errno.ENOPROTOOPT
            return
        # kernels (6.16+) that give a pidfd for a reaped process: it says the process is gone
        assert peer.pidfd >= 0, "SO_PEERPIDFD works here: the liveness check must not be skipped"
        try:
            with pytest.raises(CgroupNotFound):
                cgroup_of(peer)
        finally:
            peer.close()
    finally:
        conn.close()
        listener.close()
