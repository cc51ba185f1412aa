"""Fault matrix, the client's thread meter through the agent (backends/agent_meter.py): an agent
that does not know the op (an older one), one with no room, one that does not answer or answers
nonsense. The meter falls back to getrusage, never raises, and does not ask again in a way that
would close more lease connections. A real socket pair, the test playing the agent's end."""

from __future__ import annotations

import json
import mmap
import socket
import threading
from collections.abc import Iterator

import pytest

from rtml_ebpf.backends.agent_meter import AgentThreadMeter
from rtml_ebpf.backends.meter import RUSAGE


class FakeAgentEnd:
    """The agent's end of one lease connection: answers each request with ``reply`` (None: silence)."""

    def __init__(self, reply: bytes | None) -> None:
        self.client, self.agent = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.client.setblocking(False)
        self.reply = reply
        self.asked: list[dict] = []
        self.lock = threading.Lock()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while True:
            try:
                data = self.agent.recv(4096)
            except OSError:
                return
            if not data:
                return
            self.asked.append(json.loads(data))
            if self.reply is not None:
                self.agent.send(self.reply)

    def live(self) -> tuple[socket.socket, threading.Lock]:
        return self.client, self.lock

    def close(self) -> None:
        self.client.close()
        self.agent.close()
        self._t.join(timeout=5)


@pytest.fixture
def end(request: pytest.FixtureRequest) -> Iterator[FakeAgentEnd]:
    e = FakeAgentEnd(request.param)
    yield e
    e.close()


def measure(meter: AgentThreadMeter) -> tuple[int, tuple[int, int]]:
    net0 = meter.begin()
    buf = mmap.mmap(-1, 4 << 20)  # a fresh mapping: every page is a first touch (malloc may reuse)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    try:
        return net0, meter.read()
    finally:
        buf.close()


@pytest.mark.parametrize("end", [json.dumps({"ok": False, "error": "op='meter': a new connection asks ..."}).encode()],
                         indirect=True)
def test_an_agent_without_the_op_turns_the_meter_off_after_one_ask(end: FakeAgentEnd) -> None:
    meter = AgentThreadMeter(end.live)
    net0, (net1, peak1) = measure(meter)
    assert net1 - net0 >= 4 << 20 and peak1 == net1  # getrusage: growth, net == peak
    measure(meter)
    t = threading.Thread(target=measure, args=(meter,))
    t.start()
    t.join()
    assert len(end.asked) == 1 and end.asked[0]["op"] == "meter", end.asked
    assert meter.off and "op='meter'" in meter.off
    assert meter.stats()["off"] == meter.off


@pytest.mark.parametrize("end", [json.dumps({"ok": False, "error": "no room", "full": True}).encode()],
                         indirect=True)
def test_no_room_is_getrusage_for_that_thread_and_no_ask_until_later(end: FakeAgentEnd) -> None:
    meter = AgentThreadMeter(end.live)
    measure(meter)
    measure(meter)
    assert len(end.asked) == 1 and meter.refused == 1 and meter.off is None
    t = threading.Thread(target=measure, args=(meter,))  # another thread asks for itself
    t.start()
    t.join()
    assert len(end.asked) == 2 and meter.refused == 2


@pytest.mark.parametrize("end", [None, b"[" * 3000, b"\xff", json.dumps({"ok": True, "entry": 10 ** 9}).encode(),
                                 json.dumps({"ok": True, "entry": 3, "gen": 1}).encode()], indirect=True)
def test_silence_or_nonsense_is_getrusage_and_the_connection_is_asked_no_more(end: FakeAgentEnd) -> None:
    meter = AgentThreadMeter(end.live)
    net0, (net1, peak1) = measure(meter)
    assert net1 - net0 >= 4 << 20 and peak1 == net1
    assert meter.read()[0] >= RUSAGE.read()[0] - (1 << 20)  # still the rusage source
    for _ in range(3):
        measure(meter)
    t = threading.Thread(target=measure, args=(meter,))
    t.start()
    t.join()
    # silence, nonsense, a grant without pages: that connection is asked no more
    assert len(end.asked) == 1, end.asked
    assert meter.registered == 0 and meter.off is None
