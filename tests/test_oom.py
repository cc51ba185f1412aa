"""OOM event records decoded from the ring's bytes (rtml_ebpf/oom.py), on made-up events."""

from __future__ import annotations

from rtml_ebpf import oom
from rtml_ebpf.config import PAGE_SIZE
from rtml_ebpf.ebpf import abi


def event(names: list[str], *, limit_depth: int = 0, limit_pages: int = abi.UNLIMITED_PAGES, flags: int = 0,
          usage_pages: int = 10) -> abi.OomEvent:
    ev = abi.OomEvent(pid=42, tid=43, comm=b"worker", levels=len(names), limit_depth=limit_depth,
                      limit_pages=limit_pages, usage_pages=usage_pages, flags=flags, rss_anon_pages=5,
                      rss_file_pages=2, rss_shmem_pages=1, cgroup_id=7)
    for i, name in enumerate(names):  # leaf first, as the program writes them
        ev.names[i].value = name.encode()
    return ev


def test_path_is_rebuilt_root_first_and_the_limit_cgroup_is_its_ancestor() -> None:
    k = oom.from_event(event(["c", "b", "a"], limit_depth=1, limit_pages=100))
    assert k.cgroup == "/a/b/c" and k.limit_cgroup == "/a/b"
    assert k.limit_bytes == 100 * PAGE_SIZE and k.usage_bytes == 10 * PAGE_SIZE
    assert k.rss_bytes == 8 * PAGE_SIZE and k.pid == 42 and k.tid == 43 and k.comm == "worker"


def test_unlimited_path_has_no_limit_and_the_root_is_slash() -> None:
    k = oom.from_event(event([]))
    assert k.cgroup == "/" and k.limit_cgroup is None and k.limit_bytes is None


def test_a_cut_path_says_so() -> None:
    k = oom.from_event(event(["leaf", "mid"], flags=abi.EVENT_TRUNCATED))
    assert k.cgroup == "/.../mid/leaf" and k.as_dict()["path_truncated"] is True


def test_a_cut_name_says_so_too() -> None:
    k = oom.from_event(event(["x" * 127, "mid"], flags=abi.EVENT_NAME_CUT))
    assert k.cgroup == "/mid/" + "x" * 127 and k.truncated


def test_kubelet_paths_carry_pod_labels() -> None:
    uid = "0f5e7a2c-3b1d-4e8f-9a6b-7c2d1e0f3a4b"
    cid = "ab" * 32
    names = [f"cri-containerd-{cid}.scope", f"kubepods-burstable-pod{uid.replace('-', '_')}.slice",
             "kubepods-burstable.slice", "kubepods.slice"]
    d = oom.from_event(event(names, limit_depth=1, limit_pages=1000)).as_dict()
    assert d["pod_uid"] == uid and d["container_id"] == cid and d["qos"] == "burstable"
    assert d["runtime"] == "containerd" and d["limit_cgroup"].endswith(".slice")
    assert d["victim_rss_bytes"] == 8 * PAGE_SIZE and d["source"] == "bpf"


def test_within_is_the_path_or_below_it() -> None:
    assert oom.within("/a/b", "/a") and oom.within("/a", "/a") and oom.within("/a", "/")
    assert not oom.within("/ab", "/a")
