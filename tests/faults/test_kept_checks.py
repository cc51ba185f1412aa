"""Fault matrix, kept checks (issue 21, item 7): a check kept at construction
(``check = lim.is_mem_limit_reached``, as the middlewares with admission=False and
``guard(limiter=lim)`` keep it) follows the Limiter's current backend after the node agent
lost its programs (kill -9 of an unpinned agent), and after the Limiter is back on a new
agent. Before, it answered "not reached" for good at any usage. A real agent, a real client
as uid 65534 in a real cgroup holding memory over its threshold."""

from __future__ import annotations

import json
import time

import pytest
from support.agent import AgentProcess, client_env, glob_for, nobody_python
from support.cgroups import MiB, make_cgroup, needs_bpf, needs_cgroups

pytestmark = [pytest.mark.root, needs_bpf, needs_cgroups]

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]

CLIENT = """
import json, sys, time
from rtml_ebpf import Limiter, guard, MemoryLimitReached
lim = Limiter(backend="agent", threshold=0.4, metric="usage", relief=False)   # 102 MiB of 256
check = lim.is_mem_limit_reached                                               # kept, as a middleware keeps it
@guard(limiter=lim)
def work():
    return 1
held: "bytearray | None" = bytearray(141 << 20)
held[::4096] = b"\\1" * (len(held) // 4096)
time.sleep(0.3)
print(json.dumps({"ready": time.time()}), flush=True)
samples = []
end = time.monotonic() + float(sys.argv[1])
was_polled = back = freed = None
while time.monotonic() < end:
    if lim.backend == "poll":
        was_polled = True
    elif was_polled and back is None:
        back = time.time()
    elif back is not None and freed is None and time.time() > back + 0.5:
        held = None                                                            # back on the agent: free it
        freed = time.time()
    elif freed is not None and time.time() > freed + 1.5:
        break
    try:
        work()
        guarded = False
    except MemoryLimitReached:
        guarded = True
    samples.append([time.time(), lim.backend, check(), lim.is_mem_limit_reached(), guarded])
    time.sleep(0.01)
print(json.dumps({"samples": samples, "reason": lim.stats().backend_reason, "freed": freed}), flush=True)
"""


def test_7_a_kept_check_follows_the_limiter_after_the_agent_is_killed_and_back() -> None:
    with make_cgroup(limit=256 * MiB) as cg:
        agent = AgentProcess(glob_for(cg))
        second = None
        try:
            client = cg.popen([*NOBODY, nobody_python(), "-c", CLIENT, "30"], env=client_env(agent))
            assert client.stdout is not None
            line = client.stdout.readline()
            assert line, client.communicate(timeout=30)[1][-3000:]
            time.sleep(0.5)
            killed = time.time()
            agent.kill9()  # --no-pin: its programs go with it
            time.sleep(2.0)
            second = AgentProcess(glob_for(cg), socket_dir=agent.dir)
            out, err = client.communicate(timeout=60)
            assert client.returncode == 0, err[-3000:]
        finally:
            if second is not None:
                second.stop()
            else:
                agent.stop()
    r = json.loads(out.strip().splitlines()[-1])
    samples = r["samples"]
    before = [s for s in samples if s[0] < killed]
    assert before and all(s[1] == "agent" and s[2] and s[3] and s[4] for s in before), before[:3]
    polled = [s for s in samples if s[1] == "poll"]
    assert polled, f"never fell back to polling: {r['reason']}"
    # Detection of the loss takes up to ~0.8 s (beat staleness); from the switch on, plus one
    # look of the monitor (50 ms), the kept check answers as the Limiter does: reached.
    switched = polled[0][0]
    freed = r["freed"]
    assert freed, f"did not return to the restarted agent: {r['reason']}"
    after = [s for s in samples if switched + 0.1 < s[0] < freed]
    wrong = [s for s in after if not s[2]]
    assert not wrong, f"{len(wrong)} of {len(after)} kept answers 'not reached' at 141 MiB: {wrong[:3]}"
    assert all(s[3] and s[4] for s in after), "the Limiter or the guard answered 'not reached'"
    back = [s for s in samples if s[1] == "agent" and switched < s[0] < freed]
    assert back and all(s[2] for s in back), "the kept check went stale once back on the agent"
    # and it follows the other way: the memory freed, the kept check clears with the Limiter
    cleared = [s for s in samples if s[0] > freed + 0.3]
    assert cleared and not any(s[3] for s in cleared), "the Limiter did not clear after the memory was freed"
    stuck = [s for s in cleared if s[2]]
    assert not stuck, f"{len(stuck)} of {len(cleared)} kept answers stuck at 'reached' after the memory was freed"
