/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * rtml.h - the ABI shared by rtml.bpf.c and the Python side (rtml_ebpf/_abi.py).
 *
 * Only constants and plain, naturally aligned structs live here: no kernel
 * types, no vmlinux.h, so that user space can mirror it with ctypes and a
 * test (tests/test_abi.py) can check both sides agree on every offset.
 */
#ifndef __RTML_H
#define __RTML_H

#define RTML_ABI_VERSION 6	/* 6: the enforcer's wake (config wake_pages, slot woken_*, wake ring); client thread meters (tmeters, thread pages) */

#define RTML_MAX_SLOTS 64	/* watched cgroups per in-process object (the agent sets its own at load) */
#define RTML_NESTED_WATCHES 4	/* watched cgroups on one path refreshed per event */
#define RTML_MAX_RULES 4	/* thresholds evaluated per watched cgroup */
#define RTML_WATCH_DEPTH 8	/* levels walked up from an event's memcg to a watched one */
#define RTML_LIMIT_DEPTH 8	/* page_counter ancestors walked for the effective limit */
#define RTML_MAX_THREADS 16384	/* per-thread meters, indexed by tid % RTML_MAX_THREADS (a power of 2) */

/*
 * A page counter max at or above this many pages means "no limit". The
 * kernel's PAGE_COUNTER_MAX is LONG_MAX / PAGE_SIZE (2^51 with 4 KiB pages,
 * 2^47 with 64 KiB); 2^46 pages sits below both and above any real limit.
 */
#define RTML_UNLIMITED_PAGES (1ULL << 46)

enum rtml_rule_kind {
	RTML_RULE_OFF = 0,
	RTML_RULE_FRACTION = 1,	/* trip/clear in parts per million of the effective limit */
	RTML_RULE_PAGES = 2,	/* trip/clear in pages */
};

enum rtml_metric {
	RTML_METRIC_USAGE = 0,
	RTML_METRIC_WORKING_SET = 1,	/* usage - inactive_file, what kubelet evicts on */
};

/* ctl.flags */
#define RTML_CTL_TRACK_INACTIVE 1	/* lruvec events are live: inactive_file_delta is exact */
#define RTML_CTL_FAULT_REFRESH 2	/* no memcg events: the fault hook refreshes the slot */
#define RTML_CTL_METER_OFF 4		/* nobody asked for the per-thread meter yet: skip its lookup */

/* rtml_slot.flags, written by the node agent into its slots and copied to the pages by rtml_publish */
#define RTML_SLOT_STALLING 1		/* a PSI trigger on the cgroup's memory.pressure fired within its window */

/* One threshold. A rule trips when metric >= trip and clears when metric < clear. */
struct rtml_rule {
	__u32 kind;
	__u32 metric;
	__u64 trip;
	__u64 clear;
};

/* Written by user space only (mmapped read-write), read by the programs. */
struct rtml_config {
	__u64 cgroup_id;
	__s64 inactive_file_base;	/* pages, read from memory.stat at registration */
	struct rtml_rule rules[RTML_MAX_RULES];
	__u64 wake_pages;		/* 0: off. Used pages (as the rules see them) at which the
					 * programs wake the enforcer through the `wake_events` ring */
};

/* Process-wide knobs, element 0 of the `ctl` array (mmapped read-write). */
struct rtml_ctl {
	__u32 nwatched;		/* 0: programs return at once */
	__u32 min_level;	/* shallowest cgroup level that is watched */
	__u32 flags;
	__u32 abi_version;
	__u32 gen;		/* bumped after every change of the watch map */
	__u32 events_lost;	/* OOM events the ring buffer had no room for (programs add) */
};

/*
 * Written by the programs, and by user space in two places only: once before
 * the cgroup is watched (the first reading), and, where no memcg events are
 * live, by the upkeep, which re-reads the cgroup files (frees and inactive_file
 * are invisible to the fault hook) and rewrites usage, the verdict bytes and the
 * trip counts, without the sequence pair (a user-space add would race the
 * programs' atomic ones and leave the pair unequal): a stats() reading taken
 * at that moment can mix two readings; the verdict bytes are single bytes.
 * Fractional rules are fractions of the ceiling: the lower of limit_pages (max) and
 * high_pages (memory.high, where the kernel starts throttling in reclaim), so a
 * service trips before it is throttled. headroom_pages stays the room to max.
 * The hot path reads one byte, tripped[r]; the other fields are
 * for stats(). Multi-field reads are consistent when seq_begin read after
 * them equals seq_end read before them (writers on several CPUs bump begin,
 * write, then bump end). The slot is rewritten only when the page counter
 * moved (or inactive_file did): the counter moves in per-CPU batches of 64
 * pages, so most events leave it alone and cost a compare.
 */
struct rtml_slot {
	__u8 tripped[RTML_MAX_RULES];
	__u32 level;			/* cgroup depth below the hierarchy root */
	__u64 seq_begin;
	__u64 seq_end;
	__u64 cgroup_id;
	__u64 usage_pages;		/* the watched cgroup's own page counter */
	__u64 limit_pages;		/* tightest max on the path to the root */
	__s64 headroom_pages;		/* min(max - usage) over limited ancestors */
	__u64 limit_depth;		/* levels above the watched cgroup where that max sits */
	__s64 inactive_file_delta;	/* pages, summed from lruvec events since registration */
	__u64 oom_kills;		/* OOM victims chosen in the subtree */
	__u64 refreshes;		/* times the snapshot fields were rewritten */
	__u64 updated_ns;		/* bpf_ktime_get_ns() of the last rewrite (CLOCK_MONOTONIC) */
	__u64 trips[RTML_MAX_RULES];	/* clear -> tripped transitions per rule */
	__u64 trip_pages[RTML_MAX_RULES]; /* each rule's trip point under the current limit */
	__s64 inactive_file_base;	/* pages; in a client page only (a copy of the config's) */
	__u64 high_pages;		/* lowest memory.high on the path (>= RTML_UNLIMITED_PAGES: none) */
	__s64 high_room_pages;		/* min(high - usage) over ancestors with a memory.high */
	__u64 high_depth;		/* levels above the watched cgroup where that high sits */
	__u64 flags;			/* RTML_SLOT_*: the agent's, never the programs' */
	__u64 woken_ns;			/* when the programs last woke the enforcer for this slot */
	__u64 woken_pages;		/* the wake level they woke it at (a new level wakes at once) */
	__u64 wakes;			/* wake records written */
	__u64 wakes_lost;		/* wake records the ring had no room for */
	__u64 _reserved[3];		/* pads the slot to 256 bytes */
};

/*
 * The node agent's pages. Each client cgroup gets a one-element BPF_F_MMAPABLE array
 * holding a copy of its slot (an inner map of the `pages` array of maps), frozen before
 * it is handed out: the client maps it read-only, only the programs write it. Every
 * client also maps the `beat` page, which a BPF timer rewrites every RTML_BEAT_MS while
 * the agent's programs are loaded (pinned or held): a beat older than a second means
 * nothing writes the pages any more.
 */
#define RTML_BEAT_MS 100

struct rtml_beat {
	__u64 beat_ns;			/* bpf_ktime_get_ns() (CLOCK_MONOTONIC) of the last beat */
	__u64 beats;
	__u32 abi_version;
	__u32 period_ms;
	__u64 _reserved[5];
};

/* The context of the rtml_publish program, run by the agent (BPF_PROG_TEST_RUN). */
#define RTML_PUBLISH_START_BEAT 1	/* (re)start the beat timer */
#define RTML_PUBLISH_RETIRE 2		/* the slot is freed: mark its page (cgroup_id 0), copy nothing */

struct rtml_publish_args {
	__u32 slot;			/* copy this slot (and its config's base) into its page */
	__u32 flags;			/* RTML_PUBLISH_* */
};

/*
 * Per-CPU event counters, one element per slot (a BPF_MAP_TYPE_PERCPU_ARRAY):
 * plain increments on the CPU that saw the event, summed by user space.
 * Charged/uncharged pages by kind are the resident growth counters.
 */
struct rtml_counters {
	__u64 anon_charged;
	__u64 anon_uncharged;
	__u64 file_charged;
	__u64 file_uncharged;
	__u64 kernel_charged;
	__u64 kernel_uncharged;
	__u64 sock_charged;
	__u64 sock_uncharged;
	__u64 faults;			/* user page faults by tasks in the subtree */
	__u64 events;			/* program runs that found this slot */
};

/*
 * One thread's memcg charges, for per-request cost (element tid % RTML_MAX_THREADS
 * of the mmapable `threads` array). User space registers a thread by writing its
 * tid and resets peak_pages to net_pages when a request starts; the programs add
 * every charge (+) and uncharge (-) made in that thread's context inside a watched
 * cgroup, and only while tid matches (a collision leaves the entry to its holder).
 */
struct rtml_thread {
	__u64 tid;
	__s64 net_pages;		/* charged - uncharged since registered */
	__s64 peak_pages;		/* max of net_pages since the last reset */
	__u64 charged_pages;		/* charges only */
};

/*
 * One OOM victim, as the mark_victim hook saw it (6.8+), written to the `oom_events`
 * ring buffer. Every victim on the node, watched cgroup or not. The cgroup path is
 * carried as names (leaf first) because the runtime often removes a killed
 * container's cgroup before user space reads the event.
 */
#define RTML_EVENT_DEPTH 10	/* cgroup levels named in an event, leaf first */
#define RTML_EVENT_NAME 128	/* bytes per level name (kubelet names are under 100) */
#define RTML_EVENT_TRUNCATED 1	/* the path is deeper than RTML_EVENT_DEPTH: the top is cut */
#define RTML_EVENT_NAME_CUT 2	/* a level's name was longer than RTML_EVENT_NAME */
#define RTML_OOM_RING_LIBRARY 4096	/* a library process's ring: nobody reads it */

struct rtml_oom_event {
	__u64 time_ns;			/* bpf_ktime_get_ns() at the victim's choice (CLOCK_MONOTONIC) */
	__u64 cgroup_id;		/* the victim's memory cgroup (kernfs inode) */
	__u64 limit_cgroup_id;		/* the cgroup on the path with least room: the one that ran out */
	__u64 usage_pages;		/* that cgroup's page counter */
	__u64 limit_pages;		/* its max (>= RTML_UNLIMITED_PAGES: nothing on the path is limited) */
	__u64 rss_anon_pages;		/* the victim's mm counters (per-CPU batched: approximate) */
	__u64 rss_file_pages;
	__u64 rss_shmem_pages;
	__u32 pid;			/* thread group id */
	__u32 tid;
	__u32 levels;			/* names filled */
	__u32 limit_depth;		/* levels above the victim's cgroup where limit_cgroup_id sits */
	__u32 flags;			/* RTML_EVENT_* */
	__u32 _pad;
	char comm[16];
	char names[RTML_EVENT_DEPTH][RTML_EVENT_NAME];
};

/*
 * The enforcer's wake (admission, rtml_ebpf/admission/enforce.py). User space writes a level,
 * config.wake_pages, the lowest usage at which its next look could end a request; on the charge
 * path, when a slot's used pages (the rules' "used": as the tightest ancestor sees them) reach it,
 * the programs write one record to the `wake_events` ring with BPF_RB_FORCE_WAKEUP, so a consumer
 * blocked on the ring wakes at once instead of at its next poll: on a new level at once, then at
 * most every RTML_WAKE_EVERY_NS per slot while usage stays at or above it. Level 0 costs a compare.
 * One consumer per ring: the process that loaded the programs, or the node agent (which forwards
 * each record to the clients of that cgroup that asked).
 */
#define RTML_WAKE_EVERY_NS 1000000ULL
#define RTML_WAKE_RING 16384		/* bytes of the wake ring (about 290 records) */

struct rtml_wake {
	__u64 time_ns;			/* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64 cgroup_id;		/* the watched cgroup whose level was reached */
	__u64 used_pages;		/* its used pages then */
	__u64 wake_pages;		/* the level reached */
	__u32 slot;
	__u32 tid;			/* the charging thread (kernel pid), as the process sees it on the host */
	__u32 pid;			/* its thread group */
	__u32 _pad;
};

/* ---- Client thread meters (bpf/thread_pages.bpf.h, rtml_ebpf/agent/thread_pages.py) ---------------
 * The node agent lends an unprivileged client the kernel's per-thread meter for its own threads
 * only. Per client cgroup (slot) two one-page maps: the meter page (struct rtml_tpage, frozen:
 * only programs write it, the client maps it read-only) and the begin page (struct rtml_tbegin,
 * mapped read-write by the client: its only input, a number per entry that restarts the
 * entry's peak). The agent alone writes `tmeters` (host tid -> struct rtml_tref), after checking
 * from the kernel that the tid is a thread of the asking process in its cgroup, and keeps
 * `tmeter_n` (element 0: registered client threads on the node; 0: the programs stop at it).
 */
#define RTML_TPAGE_ENTRIES 128	/* threads per client cgroup (a power of 2; 128 * 32 bytes = a page) */
#define RTML_TMETER_MAX 8192	/* registered client threads on the node (the agent sizes `tmeters`) */

struct rtml_tentry {
	__u32 tid;			/* host tid of the holder */
	__u32 gen;			/* the agent's allocation number; another one: nothing charged yet */
	__s64 net_pages;		/* charged - uncharged since the allocation */
	__s64 peak_pages;		/* max of net_pages since the begin number became epoch */
	__u64 epoch;			/* the begin page's number the peak counts from */
};

struct rtml_tpage {
	struct rtml_tentry e[RTML_TPAGE_ENTRIES];
};

struct rtml_tbegin {
	__u64 epoch[RTML_TPAGE_ENTRIES];	/* written by the client: a change restarts that entry's peak */
};

struct rtml_tref {
	__u32 slot;			/* the client cgroup's slot: its meter and begin pages */
	__u32 entry;			/* the thread's entry in them */
	__u32 gen;			/* copied into the entry at its first charge */
	__u32 tgid;			/* the thread's process: a reused tid of another process is not charged */
};
/* ---- end of client thread meters ---------------------------------------------------------------- */

#endif /* __RTML_H */
