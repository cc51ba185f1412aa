"""ctypes mirror of bpf/rtml.h. tests/test_abi.py compiles rtml.h with the C
compiler and checks every offset here against it."""

from __future__ import annotations

import ctypes

ABI_VERSION = 6  # 6: the enforcer's wake (config wake_pages, slot woken_*, wake ring)
MAX_SLOTS = 64
NESTED_WATCHES = 4
BEAT_MS = 100
MAX_RULES = 4
UNLIMITED_PAGES = 1 << 46
MAX_THREADS = 16384

RULE_OFF, RULE_FRACTION, RULE_PAGES = 0, 1, 2
METRIC_USAGE, METRIC_WORKING_SET = 0, 1
CTL_TRACK_INACTIVE = 1
CTL_FAULT_REFRESH = 2
CTL_METER_OFF = 4  # set at load; cleared for good by the first thread_meter() (runtime, agent clients)
SLOT_STALLING = 1  # Slot.flags: the agent's PSI trigger on the cgroup fired within its window

u8, u32, u64, s64 = ctypes.c_uint8, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64


class Rule(ctypes.Structure):
    _fields_ = [("kind", u32), ("metric", u32), ("trip", u64), ("clear", u64)]


class Config(ctypes.Structure):
    _fields_ = [("cgroup_id", u64), ("inactive_file_base", s64), ("rules", Rule * MAX_RULES), ("wake_pages", u64)]


class Ctl(ctypes.Structure):
    _fields_ = [("nwatched", u32), ("min_level", u32), ("flags", u32), ("abi_version", u32), ("gen", u32),
                ("events_lost", u32)]


class Slot(ctypes.Structure):
    _fields_ = [
        ("tripped", u8 * MAX_RULES),
        ("level", u32),
        ("seq_begin", u64),
        ("seq_end", u64),
        ("cgroup_id", u64),
        ("usage_pages", u64),
        ("limit_pages", u64),
        ("headroom_pages", s64),
        ("limit_depth", u64),
        ("inactive_file_delta", s64),
        ("oom_kills", u64),
        ("refreshes", u64),
        ("updated_ns", u64),
        ("trips", u64 * MAX_RULES),
        ("trip_pages", u64 * MAX_RULES),
        ("inactive_file_base", s64),
        ("high_pages", u64),
        ("high_room_pages", s64),
        ("high_depth", u64),
        ("flags", u64),
        ("woken_ns", u64),
        ("woken_pages", u64),
        ("wakes", u64),
        ("wakes_lost", u64),
        ("_reserved", u64 * 3),
    ]


class Beat(ctypes.Structure):
    _fields_ = [("beat_ns", u64), ("beats", u64), ("abi_version", u32), ("period_ms", u32), ("_reserved", u64 * 5)]


class PublishArgs(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32)]


PUBLISH_START_BEAT = 1
PUBLISH_RETIRE = 2


class Counters(ctypes.Structure):
    _fields_ = [
        ("anon_charged", u64),
        ("anon_uncharged", u64),
        ("file_charged", u64),
        ("file_uncharged", u64),
        ("kernel_charged", u64),
        ("kernel_uncharged", u64),
        ("sock_charged", u64),
        ("sock_uncharged", u64),
        ("faults", u64),
        ("events", u64),
    ]


class Thread(ctypes.Structure):
    _fields_ = [("tid", u64), ("net_pages", s64), ("peak_pages", s64), ("charged_pages", u64)]


EVENT_DEPTH = 10
EVENT_NAME = 128
EVENT_TRUNCATED = 1
EVENT_NAME_CUT = 2
OOM_RING_LIBRARY = 4096


class OomEvent(ctypes.Structure):
    _fields_ = [
        ("time_ns", u64),
        ("cgroup_id", u64),
        ("limit_cgroup_id", u64),
        ("usage_pages", u64),
        ("limit_pages", u64),
        ("rss_anon_pages", u64),
        ("rss_file_pages", u64),
        ("rss_shmem_pages", u64),
        ("pid", u32),
        ("tid", u32),
        ("levels", u32),
        ("limit_depth", u32),
        ("flags", u32),
        ("_pad", u32),
        ("comm", ctypes.c_char * 16),
        ("names", (ctypes.c_char * EVENT_NAME) * EVENT_DEPTH),
    ]


WAKE_EVERY_NS = 1_000_000
WAKE_RING = 16384


class Wake(ctypes.Structure):
    """One wake record (struct rtml_wake): the slot's used pages reached the enforcer's level."""

    _fields_ = [
        ("time_ns", u64),
        ("cgroup_id", u64),
        ("used_pages", u64),
        ("wake_pages", u64),
        ("slot", u32),
        ("tid", u32),
        ("pid", u32),
        ("_pad", u32),
    ]


GROWTH_KINDS = ("anon", "file", "kernel", "sock")
# The slot and config as int64 words, for the lock-free fast readings (Runtime.room).
SLOT_WORDS = ctypes.sizeof(Slot) // 8
CONFIG_WORDS = ctypes.sizeof(Config) // 8
W_USAGE = Slot.usage_pages.offset // 8
W_LIMIT = Slot.limit_pages.offset // 8
W_HEADROOM = Slot.headroom_pages.offset // 8
W_INACTIVE_DELTA = Slot.inactive_file_delta.offset // 8
W_HIGH = Slot.high_pages.offset // 8
W_HIGH_ROOM = Slot.high_room_pages.offset // 8
W_FLAGS = Slot.flags.offset // 8
C_WAKE = Config.wake_pages.offset // 8  # config word of the enforcer's wake level
TRIPPED_OFFSET = Slot.tripped.offset
SEQ_BEGIN_OFFSET = Slot.seq_begin.offset
SEQ_END_OFFSET = Slot.seq_end.offset
# struct rtml_thread as int64 words, for the per-thread meter (rtml_ebpf/backends/meter.py)
THREAD_WORDS = ctypes.sizeof(Thread) // 8
T_TID = Thread.tid.offset // 8
T_NET = Thread.net_pages.offset // 8
T_PEAK = Thread.peak_pages.offset // 8
T_CHARGED = Thread.charged_pages.offset // 8


# ---- Client thread meters (rtml.h's block of that name; agent/thread_pages.py, backends/agent_meter.py) ----
TPAGE_ENTRIES = 128
TMETER_MAX = 8192


class TEntry(ctypes.Structure):
    _fields_ = [("tid", u32), ("gen", u32), ("net_pages", s64), ("peak_pages", s64), ("epoch", u64)]


class TPage(ctypes.Structure):
    _fields_ = [("e", TEntry * TPAGE_ENTRIES)]


class TBegin(ctypes.Structure):
    _fields_ = [("epoch", u64 * TPAGE_ENTRIES)]


class TRef(ctypes.Structure):
    _fields_ = [("slot", u32), ("entry", u32), ("gen", u32), ("tgid", u32)]


TENTRY_WORDS = ctypes.sizeof(TEntry) // 8
TE_IDS = TEntry.tid.offset // 8  # tid in the low half, gen in the high half (little-endian hosts)
TE_NET = TEntry.net_pages.offset // 8
TE_PEAK = TEntry.peak_pages.offset // 8
TE_EPOCH = TEntry.epoch.offset // 8
# ---- end of client thread meters ----
