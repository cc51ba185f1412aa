"""rtml_ebpf/watch.py without a kernel: the agent's exposition parsed into rows, ordering,
filters, the bar, and the command's argument errors."""

from __future__ import annotations

import subprocess
import sys

from rtml_ebpf import watch

POD = 'cgroup="/kubepods/burstable/podX/c \\"q\\"",pod_uid="X",container_id="c",qos="burstable"'
EXPOSITION = "\n".join([
    "# HELP rtml_cgroup_usage_bytes x",
    'rtml_cgroup_usage_bytes{cgroup="/a",pod_uid=""} 100',
    f"rtml_cgroup_usage_bytes{{{POD}}} 50",
    'rtml_cgroup_usage_bytes{cgroup="/free",pod_uid=""} 70',
    'rtml_cgroup_limit_bytes{cgroup="/a",pod_uid=""} 400',
    'rtml_cgroup_headroom_bytes{cgroup="/a",pod_uid=""} 300',
    f"rtml_cgroup_limit_bytes{{{POD}}} 60",
    f"rtml_cgroup_headroom_bytes{{{POD}}} 10",
    'rtml_cgroup_growth_bytes_per_second{cgroup="/a",pod_uid=""} 1.5e+06',
    'rtml_cgroup_oom_kills_total{cgroup="/a",pod_uid=""} 2',
    "rtml_agent_watched_cgroups 3",
])


def test_rows_from_the_exposition_sorted_by_least_headroom() -> None:
    rows = watch.by_least_headroom(watch.parse_metrics(EXPOSITION))
    assert [r.cgroup for r in rows] == ['/kubepods/burstable/podX/c "q"', "/a", "/free"]
    pod, a, free = rows
    assert pod.pod_uid == "X" and pod.qos == "burstable" and pod.headroom_bytes == 10
    assert a.growth_bytes_per_s == 1.5e6 and a.oom_kills == 2 and a.limit_bytes == 400
    assert free.limit_bytes is None and free.headroom_bytes is None


def test_filters_and_the_common_parent() -> None:
    rows = watch.parse_metrics(EXPOSITION)
    assert [r.cgroup for r in watch.keep(rows, ("/kubepods/*",))] == ['/kubepods/burstable/podX/c "q"']
    assert watch.common_parent(["/x/y/a", "/x/y/b/c"]) == "/x/y"
    assert watch.common_parent(["/x/a"]) == "/"
    assert watch.common_parent(["/x/a", "/x/a"]) == "/x"


def test_bar_fills_to_usage_and_marks_the_threshold() -> None:
    row = watch.Row(cgroup="/a", usage_bytes=50, working_set_bytes=25, limit_bytes=100, threshold_bytes=90,
                    headroom_bytes=50, growth_bytes_per_s=None, seconds_to_limit=None, oom_kills=0, trips=0)
    text = watch.bar(row, width=10)
    assert "███▒▒" in text and text.count("|") == 1 and "[green]" in text


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rtml_ebpf.cli", "watch", *args], capture_output=True, text=True,
                          timeout=60)


def test_bad_arguments_get_a_clear_error_and_exit_2() -> None:
    for args, words in ((("--json",), "--once"), (("--interval", "0"), "--interval"),
                        (("--agent", "x:1", "--cgroup", "/tmp"), "pass one")):
        out = cli(*args)
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_no_agent_says_how_to_start_one() -> None:
    out = cli("--agent", "127.0.0.1:1", "--once")
    assert out.returncode == 4 and "rtml-ebpf agent" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_proc_net_tcp_addresses_are_written_as_the_kernel_does() -> None:
    from rtml_ebpf.agent import metrics_access

    assert metrics_access._hex_endpoint("127.0.0.1", 9909) == "0100007F:26B5"
    assert metrics_access._hex_endpoint("::1", 80) == "00000000000000000000000001000000:0050"
    assert metrics_access.is_loopback("127.0.0.1") and metrics_access.is_loopback("[::1]")
    assert not metrics_access.is_loopback("0.0.0.0")
