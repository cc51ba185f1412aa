"""The node agent under 100 hostile clients beside honest ones (issue 21's soak).

An agent on a private socket (no pins); in a memory cgroup of their own, as uid 65534:
- honest clients: connect, ask for a lease (watch), read the reply and its fds, close; each
  round trip timed (the lease latency);
- hostile clients (100 by default): a third send malformed messages (deep nesting, huge
  numbers, garbage), a third churn connections and send nothing, a third hold slow HTTP
  connections on the metrics port (a byte every 0.4 s).
Every second: the agent's RSS and open fds. The report: the honest clients' p50/p99 lease
latency per interval and the agent's RSS and fds over time (flat is the pass mark: last
interval's RSS within 10% of the first's, fds within 16). Not run in CI.

    python -m benchmarks.soak_agent [--minutes 2] [--hostile 100] [--honest 4] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.cgroups import ChildCgroup, stop_process

MiB = 1 << 20
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]

# One client process; mode honest|malformed|churn|slow; runs for SECONDS; prints latencies.
CLIENT = r'''
import json, os, socket, sys, time
mode, seconds, path, port = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
end = time.monotonic() + seconds
RULE = {"metric": "usage", "trip_ppm": 900000, "clear_ppm": 880000}
BAD = [b"[" * 4000, b'{"v":' + b"9" * 3000 + b"}", b'{"v":1e999}', b"\xff\xfe", b'{"a":"\\ud800"}']
lat, i = [], 0
def ask(payload):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.settimeout(5)
    try:
        s.connect(path)
        if payload is None:
            time.sleep(0.05); return
        s.send(payload)
        data, anc, _, _ = s.recvmsg(8192, socket.CMSG_SPACE(8))
        for _, _, raw in anc:
            for k in range(0, len(raw) - 3, 4): os.close(int.from_bytes(raw[k:k + 4], "little"))
        return data
    except OSError:
        return None
    finally:
        s.close()
if mode == "slow":
    socks = []
    while time.monotonic() < end:
        while len(socks) < 3:
            try: socks.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            except OSError: break
        for s in list(socks):
            try: s.send(b"G")
            except OSError: socks.remove(s); s.close()
        time.sleep(0.4)
while mode != "slow" and time.monotonic() < end:
    if mode == "honest":
        t0 = time.perf_counter()
        reply = ask(json.dumps({"v": 1, "op": "watch", "rules": [RULE]}).encode())
        if reply and json.loads(reply).get("ok"):
            lat.append((time.time(), time.perf_counter() - t0))
        time.sleep(0.02)
    elif mode == "malformed":
        ask(BAD[i % len(BAD)]); i += 1; time.sleep(0.01)
    else:
        ask(None)
print(json.dumps(lat))
'''


def agent_figures(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--hostile", type=int, default=100)
    ap.add_argument("--honest", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    seconds = args.minutes * 60
    work = tempfile.mkdtemp(prefix="rtml-soak-agent-")
    os.chmod(work, 0o755)
    sock = os.path.join(work, "agent.sock")
    log = open(os.path.join(work, "agent.log"), "w+")
    agent = subprocess.Popen([sys.executable, "-m", "rtml_ebpf.cli", "agent", "--socket", sock, "--no-pin",
                              "--metrics-addr", "127.0.0.1:0", "--watch", "/nothing-here*"],
                             stdout=log, stderr=subprocess.STDOUT)
    port = 0
    for _ in range(300):
        log.seek(0)
        found = re.findall(r"health probes at http://[^:]+:(\d+)/", log.read())
        if found and os.path.exists(sock):
            port = int(found[-1])
            break
        time.sleep(0.1)
    assert port, "the agent did not start"
    samples: list[tuple[float, int, int]] = []
    with ChildCgroup(512 * MiB, prefix="rtml-soak") as honest_cg, ChildCgroup(512 * MiB, prefix="rtml-soak") as bad_cg:
        procs = []
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
        for _ in range(args.honest):
            procs.append(("honest", honest_cg.popen([*NOBODY, sys.executable, "-c", CLIENT, "honest", str(seconds),
                                                     sock, str(port)], env=env, stdout=subprocess.PIPE)))
        modes = ("malformed", "churn", "slow")
        for i in range(args.hostile):
            procs.append((modes[i % 3], bad_cg.popen([*NOBODY, sys.executable, "-c", CLIENT, modes[i % 3],
                                                      str(seconds), sock, str(port)], env=env,
                                                     stdout=subprocess.DEVNULL)))
        t0 = time.time()
        while time.time() - t0 < seconds + 2 and any(p.poll() is None for _, p in procs):
            samples.append((time.time() - t0, *agent_figures(agent.pid)))
            time.sleep(1.0)
        lat: list[tuple[float, float]] = []
        for mode, p in procs:
            out, _ = p.communicate(timeout=60)
            if mode == "honest" and out.strip():
                lat += [(t - t0, d) for t, d in json.loads(out.strip().splitlines()[-1])]
    alive = agent.poll() is None
    stop_process(agent)
    buckets = max(1, int(seconds // 30))
    rows = []
    for b in range(buckets):
        lo, hi = b * seconds / buckets, (b + 1) * seconds / buckets
        ds = sorted(d for t, d in lat if lo <= t < hi)
        ss = [s for s in samples if lo <= s[0] < hi]
        if ds and ss:
            rows.append({"from_s": round(lo), "leases": len(ds), "p50_ms": round(ds[len(ds) // 2] * 1e3, 2),
                         "p99_ms": round(ds[min(len(ds) - 1, int(len(ds) * 0.99))] * 1e3, 2),
                         "rss_kib": int(statistics.median(s[1] for s in ss)),
                         "fds": int(statistics.median(s[2] for s in ss))})
    flat = bool(rows) and rows[-1]["rss_kib"] <= rows[0]["rss_kib"] * 1.1 and rows[-1]["fds"] <= rows[0]["fds"] + 16
    report = {"hostile": args.hostile, "honest": args.honest, "seconds": seconds, "agent_alive": alive,
              "flat": flat, "intervals": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "soak_agent.json"), "w") as f:
        json.dump(report, f, indent=2)
    print("from_s  leases  p50_ms  p99_ms  rss_kib  fds")
    for r in rows:
        print(f"{r['from_s']:6d}  {r['leases']:6d}  {r['p50_ms']:6.2f}  {r['p99_ms']:6.2f}  "
              f"{r['rss_kib']:7d}  {r['fds']:3d}")
    print(f"agent alive: {alive}; RSS and fds flat: {flat}")
    return 0 if alive and flat else 1


if __name__ == "__main__":
    sys.exit(main())
