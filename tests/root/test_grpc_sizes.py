"""gRPC calls whose cost follows their message's size, on real servers in a real limited cgroup.

The handler decodes each message into 32x its size (96 KiB -> 3 MiB; 2.25 MiB -> 72 MiB) and holds
it, so 10% of the calls cost 24x the rest: a call admitted on its route's estimate must be refused
once its message shows it no longer fits, before its handler gets the message (issue 19, defect D5:
the interceptors ignored that refusal and the server was OOM-killed under the flood). Sync and
grpc.aio, a unary request and a request stream whose second message is the large one. Unguarded,
the same server is OOM-killed; guarded, no OOM kill, the large calls that fit are served and the
refused ones end with RESOURCE_EXHAUSTED (``code="resource_exhausted"``) and the refusal's details,
never UNAVAILABLE from a killed server.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from support.cgroups import MiB, needs_bpf, needs_cgroups

from rtml_ebpf.demo.flood import free_port
from rtml_ebpf.grpc import DETAILS, ENDED_DETAILS, TOO_LARGE_DETAILS

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

LIMIT = 256 * MiB
DURATION = 12.0
CLIENTS = 40
THREADS = 32  # the sync server's pool: as many calls at once as a service sized for small messages runs
ENV = {"RTML_THRESHOLD": "0.8", "RTML_METRIC": "usage"}
KiB = 1024
SMALL, LARGE = 96 * KiB, 2304 * KiB
# (label, weight, messages): a stream's large call sends a small message first, then the large one.
UNARY = (("small", 90, (SMALL,)), ("large", 10, (LARGE,)))
STREAM = (("small", 90, (SMALL // 2, SMALL // 2)), ("large", 10, (SMALL // 2, LARGE - SMALL // 2)))
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
           ("grpc.enable_retries", 0)]
SERVER = Path(__file__).resolve().parent.parent / "support" / "grpc_server.py"


def flood(kind: str, shape: str, guard: str) -> tuple[int, Counter[str], list[str]]:
    """(OOM kills, outcomes by label, details of the calls that failed otherwise)."""
    import grpc

    from rtml_ebpf.demo.cgroups import ChildCgroup
    from rtml_ebpf.demo.flood import wait_listening

    mix = UNARY if shape == "unary" else STREAM
    port = free_port()
    counts: Counter[str] = Counter()
    odd: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    with ChildCgroup(LIMIT, prefix="rtml-grpc-sizes") as cg:
        proc = cg.popen([sys.executable, str(SERVER), str(port), guard, kind, str(THREADS)], env=ENV)
        wait_listening(port, proc)

        def client() -> None:
            rng = random.Random()
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
                unary = channel.unary_unary("/test.Mem/Decode")
                stream = channel.stream_unary("/test.Mem/DecodeStream")
                while not stop.is_set():
                    label, _, sizes = rng.choices(mix, [m[1] for m in mix])[0]
                    try:
                        if shape == "unary":
                            unary(b"x" * sizes[0], timeout=15)
                        else:
                            stream(iter([b"x" * n for n in sizes]), timeout=15)
                        outcome = "ok"
                    except grpc.RpcError as exc:
                        code, details = exc.code(), exc.details() or ""
                        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details in (DETAILS, TOO_LARGE_DETAILS):
                            outcome = "refused"
                        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and details == ENDED_DETAILS:
                            outcome = "ended"
                        else:
                            outcome = "failed"
                            with lock:
                                odd.append(f"{code.name}: {details[:120]}")
                    with lock:
                        counts[f"{label} {outcome}"] += 1
                    if outcome != "ok":
                        time.sleep(0.05)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(DURATION)
        stop.set()
        for t in threads:
            t.join(timeout=20)
        return cg.oom_kills(), counts, odd


@pytest.mark.parametrize("shape", ["unary", "stream"])
@pytest.mark.parametrize("kind", ["sync", "aio"])
@pytest.mark.parametrize("guard", ["none", "exhausted"])
def test_messages_of_mixed_sizes_under_a_flood(guard: str, kind: str, shape: str) -> None:
    oom, counts, odd = flood(kind, shape, guard)
    print(f"{kind} {shape} {guard}: {oom} OOM kills, {dict(sorted(counts.items()))}")  # shown with -s
    if guard == "none":
        assert oom >= 1, (counts, odd[:5])  # without the guard this server is OOM-killed: the test can fail
        return
    assert oom == 0, (counts, odd[:5])
    assert not odd, (counts, odd[:5])  # no UNAVAILABLE from a killed server, no other error
    assert counts["small ok"] >= 10, counts
    assert counts["large ok"] >= 1, counts  # the large calls that fit are served
    assert counts["large refused"] >= 1, counts  # and the rest are refused as a refusal is answered


@pytest.mark.parametrize("shape", ["unary", "stream", "catching"])
@pytest.mark.parametrize("kind", ["sync", "aio"])
@pytest.mark.parametrize("guard", ["admission", "exhausted"])
def test_a_message_that_does_not_fit_never_reaches_the_handler(guard: str, kind: str, shape: str) -> None:
    # The route learns on 96 KiB messages (3 MiB decoded); then a 12 MiB message (384 MiB decoded,
    # more than the cgroup's 256 MiB) is refused as it is decoded, and a 24 MiB one as too large to
    # ever fit. Had its handler got either, the server would have been OOM-killed. "catching": a
    # stream handler that catches every exception while it reads is refused all the same.
    import grpc

    from rtml_ebpf.demo.cgroups import ChildCgroup
    from rtml_ebpf.demo.flood import wait_listening

    code = grpc.StatusCode.RESOURCE_EXHAUSTED if guard == "exhausted" else grpc.StatusCode.UNAVAILABLE
    port = free_port()
    with ChildCgroup(LIMIT, prefix="rtml-grpc-sizes") as cg:
        proc = cg.popen([sys.executable, str(SERVER), str(port), guard, kind], env=ENV)
        wait_listening(port, proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
            unary = channel.unary_unary("/test.Mem/Decode")
            stream = channel.stream_unary("/test.Mem/DecodeStreamCatching" if shape == "catching"
                                          else "/test.Mem/DecodeStream")

            def call(size: int) -> bytes:
                if shape == "unary":
                    return bytes(unary(b"x" * size, timeout=30))
                return bytes(stream(iter([b"x" * SMALL, b"x" * size]), timeout=30))

            for _ in range(3):
                assert call(SMALL).startswith(b"ok"), "a small call is served"
            for size, details in ((12 * MiB, DETAILS), (24 * MiB, TOO_LARGE_DETAILS)):
                with pytest.raises(grpc.RpcError) as refused:
                    call(size)
                exc: grpc.RpcError = refused.value
                assert (exc.code(), exc.details()) == (code, details), (size, exc)
                trailing = dict(exc.trailing_metadata() or ())
                assert int(trailing["retry-after"]) >= 1, trailing  # answered as a refusal at the door is
                assert ("grpc-status-details-bin" in trailing) == (guard == "exhausted"), trailing
            assert call(SMALL).startswith(b"ok"), "the refused calls hold nothing: the next one is served"
        assert proc.poll() is None
        assert cg.oom_kills() == 0


@pytest.mark.parametrize("kind", ["sync", "aio"])
@pytest.mark.parametrize("guard", ["none", "exhausted"])
def test_a_response_stream_is_metered_as_it_answers(guard: str, kind: str) -> None:
    # Each call builds 24 MiB while it streams its answer: its cost must be measured (and so
    # learned and enforced) across the whole stream, on grpc.aio's event loop as on a pool thread.
    import grpc

    from rtml_ebpf.demo.cgroups import ChildCgroup
    from rtml_ebpf.demo.flood import wait_listening

    port = free_port()
    counts: Counter[str] = Counter()
    odd: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    with ChildCgroup(LIMIT, prefix="rtml-grpc-sizes") as cg:
        proc = cg.popen([sys.executable, str(SERVER), str(port), guard, kind, str(THREADS)], env=ENV)
        wait_listening(port, proc)

        def client() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
                call = channel.unary_stream("/test.Mem/AllocStream")
                while not stop.is_set():
                    try:
                        pieces = list(call(b"x", timeout=15))
                        outcome = "ok" if len(pieces) == 6 else "short"
                    except grpc.RpcError as exc:
                        code, details = exc.code(), exc.details() or ""
                        ours = code == grpc.StatusCode.RESOURCE_EXHAUSTED
                        outcome = "refused" if ours and details == DETAILS else "ended" if ours and \
                            details == ENDED_DETAILS else "failed"
                        if outcome == "failed":
                            with lock:
                                odd.append(f"{code.name}: {details[:120]}")
                    with lock:
                        counts[outcome] += 1
                    if outcome != "ok":
                        time.sleep(0.05)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(DURATION)
        stop.set()
        for t in threads:
            t.join(timeout=20)
        oom = cg.oom_kills()
    print(f"{kind} response stream {guard}: {oom} OOM kills, {dict(sorted(counts.items()))}")  # shown with -s
    if guard == "none":
        assert oom >= 1, (counts, odd[:5])
        return
    assert oom == 0, (counts, odd[:5])
    assert not odd and counts["short"] == 0, (counts, odd[:5])
    assert counts["ok"] >= 10 and counts["refused"] > 0, counts
