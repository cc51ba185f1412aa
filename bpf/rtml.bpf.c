// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * rtml.bpf.c - keeps, per watched memory cgroup, the kernel's own usage,
 * effective limit and threshold verdicts in a mmapable array that Python
 * reads without a syscall.
 *
 * Hooks (the loader attaches what the running kernel offers):
 *   tp_btf/mod_memcg_lruvec_state  6.13+  per-memcg LRU/anon/file stat deltas
 *   tp_btf/mod_memcg_state         6.13+  per-memcg kmem/sock stat deltas
 *   tp_btf/page_fault_user         x86    every user fault, before it is charged
 *   tp_btf/mm_page_alloc           any    large folios, for the fault-counting meter (with the fault hook only)
 *   tp_btf/mark_victim             6.8+   OOM victim with its task pointer (and oom_events)
 * Without the memcg tracepoints (before 6.13) the fault hook refreshes the
 * slot itself from the faulting task's memcg page counter (RTML_CTL_FAULT_REFRESH).
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "rtml.h"
#include "thread_pages.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/*
 * A watched cgroup may be the event's own memcg or an ancestor within
 * RTML_WATCH_DEPTH levels (a pod watched while its containers charge); up to
 * RTML_NESTED_WATCHES watched cgroups on one path are refreshed per event
 * (a Kubernetes node: kubepods, QoS class, pod, container).
 */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RTML_MAX_SLOTS);
	__type(key, __u64);		/* cgroup id (kernfs inode) */
	__type(value, __u32);		/* index into slots, configs, counters */
} watch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, RTML_MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct rtml_slot);
} slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, RTML_MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct rtml_config);
} configs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RTML_MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct rtml_counters);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rtml_ctl);
} ctl SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, RTML_MAX_THREADS);
	__type(key, __u32);
	__type(value, struct rtml_thread);
} threads SEC(".maps");

/* One client cgroup's page: a copy of its slot that only programs write (see rtml.h). */
struct page_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rtml_slot);
};

/* Slot index -> its page, where the agent made one. Empty in a library process. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, RTML_MAX_SLOTS);
	__type(key, __u32);
	__array(values, struct page_map);
} pages SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rtml_beat);
} beat SEC(".maps");

/*
 * The beat's timer, in a map of its own that no client holds: when the agent's last
 * reference (fd or pin) goes, the kernel cancels it and the beat stops, although clients
 * still hold the beat page.
 */
struct ticker {
	struct bpf_timer timer;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ticker);
} ticker SEC(".maps");

/* OOM victims for the agent (or `rtml-ebpf events`); sized by whoever reads it at load. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, RTML_OOM_RING_LIBRARY);
} oom_events SEC(".maps");

/* The enforcer's wake records (see rtml.h): read by the loading process or the node agent. */
#define RB_FORCE_WAKEUP 2	/* BPF_RB_FORCE_WAKEUP of uapi bpf.h (kernel_types.h does not carry it) */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, RTML_WAKE_RING);
} wake_events SEC(".maps");

/*
 * The last memcg this CPU saw and which watched cgroups sit above it. Stat
 * events come in runs from one memcg (about four per fault), so this spares
 * the hash walk on nearly every event. Keyed by the css's serial number, which
 * the kernel never reuses (a global counter; one cache line the event touches,
 * where the cgroup id is two pointers away), and dropped whenever user space
 * bumps ctl.gen.
 */
struct watch_cache {
	__u64 id;	/* the memcg css's serial_nr */
	__u32 gen;
	__u32 hits;
	__u32 idx[RTML_NESTED_WATCHES];
	__u32 depth[RTML_NESTED_WATCHES];
	/* the lean set's fault step, for a memcg with one watched cgroup above it (see fault_refresh) */
	__u32 skip;	/* faults this CPU may still count without reading the page counter */
	__u32 quiet_known;
	__u64 quiet;	/* that cgroup's usage below which no level is near */
	__u64 pending;	/* faults counted here, not yet in that cgroup's counters */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct watch_cache);
} wcache SEC(".maps");

enum event_kind {
	EV_NONE = 0,
	EV_ANON,
	EV_FILE,
	EV_KERNEL,
	EV_SOCK,
	EV_INACTIVE_FILE,
	EV_FAULT,
	EV_OOM,
};

struct reading {
	__u64 usage;
	__u64 limit;
	__s64 headroom;
	__u64 depth;
	__u64 high;		/* lowest memory.high on the path */
	__s64 high_room;	/* min(high - usage) over the ancestors with one */
	__u64 high_depth;
};

/* One level's memory.high into the reading (usage: that level's counter). */
static __always_inline void high_step(struct reading *r, __u64 high, __u64 usage, __u32 i)
{
	if (high >= RTML_UNLIMITED_PAGES)
		return;
	__s64 room = (__s64)high - (__s64)usage;
	if (high < r->high) {
		r->high = high;
		r->high_depth = i;
	}
	if (room < r->high_room)
		r->high_room = room;
}

struct walk {
	struct page_counter *pc;
	struct reading r;
};

/*
 * One level of the effective-limit walk. Run through bpf_loop (5.17+) so the
 * verifier checks the body once instead of once per level and branch.
 */
static long limit_step(__u32 i, struct walk *w)
{
	struct page_counter *pc = w->pc;

	if (!pc)
		return 1;
	__u64 max = pc->max;
	__u64 used = pc->usage.counter;
	/* page_counter.high exists since 5.8; v1 leaves it at PAGE_COUNTER_MAX */
	if (bpf_core_field_exists(pc->high))
		high_step(&w->r, pc->high, used, i);
	if (max < RTML_UNLIMITED_PAGES) {
		__s64 room = (__s64)max - used;
		if (max < w->r.limit) {
			w->r.limit = max;
			w->r.depth = i;
		}
		if (room < w->r.headroom)
			w->r.headroom = room;
	}
	w->pc = pc->parent;
	return 0;
}

/*
 * The same step from a page_counter the verifier cannot type (reached from a
 * css through container_of): helper reads. Only the fault hook set uses it.
 */
static long limit_step_probe(__u32 i, struct walk *w)
{
	const struct page_counter *pc = w->pc;

	if (!pc)
		return 1;
	__u64 max = BPF_CORE_READ(pc, max);
	__u64 used = BPF_CORE_READ(pc, usage.counter);
	if (bpf_core_field_exists(pc->high))
		high_step(&w->r, BPF_CORE_READ(pc, high), used, i);
	if (max < RTML_UNLIMITED_PAGES) {
		__s64 room = (__s64)max - used;
		if (max < w->r.limit) {
			w->r.limit = max;
			w->r.depth = i;
		}
		if (room < w->r.headroom)
			w->r.headroom = room;
	}
	w->pc = BPF_CORE_READ(pc, parent);
	return 0;
}

static __always_inline void walk_init(struct walk *w, struct page_counter *pc, __u64 usage)
{
	w->pc = pc;
	w->r.usage = usage;
	w->r.limit = RTML_UNLIMITED_PAGES;
	w->r.headroom = (__s64)RTML_UNLIMITED_PAGES;
	w->r.depth = 0;
	w->r.high = RTML_UNLIMITED_PAGES;
	w->r.high_room = (__s64)RTML_UNLIMITED_PAGES;
	w->r.high_depth = 0;
}

static __always_inline __u64 rule_pages(const struct rtml_rule *rule, __u64 value, __u64 limit)
{
	if (rule->kind == RTML_RULE_PAGES)
		return value;
	/* parts per million of the limit; split the product so it cannot overflow */
	if (limit < (1ULL << 40))
		return limit * value / 1000000;
	return limit / 1000000 * value;
}

/*
 * Copies a slot into its client page, if the agent made one (one lookup otherwise).
 * The page has its own sequence pair, so a client's multi-field read is consistent.
 */
static __always_inline void publish_page(__u32 idx, const struct rtml_slot *s, const struct rtml_config *cfg)
{
	__u32 zero = 0;
	void *inner = bpf_map_lookup_elem(&pages, &idx);
	struct rtml_slot *p;

	if (!inner)
		return;
	p = bpf_map_lookup_elem(inner, &zero);
	if (!p)
		return;
	__sync_fetch_and_add(&p->seq_begin, 1);
	p->level = s->level;
	p->cgroup_id = s->cgroup_id;
	p->usage_pages = s->usage_pages;
	p->limit_pages = s->limit_pages;
	p->headroom_pages = s->headroom_pages;
	p->limit_depth = s->limit_depth;
	p->high_pages = s->high_pages;
	p->high_room_pages = s->high_room_pages;
	p->high_depth = s->high_depth;
	p->flags = s->flags;
	p->inactive_file_delta = s->inactive_file_delta;
	p->inactive_file_base = cfg->inactive_file_base;
	p->oom_kills = s->oom_kills;
	p->refreshes = s->refreshes;
	p->updated_ns = s->updated_ns;
#pragma unroll
	for (int i = 0; i < RTML_MAX_RULES; i++) {
		p->tripped[i] = s->tripped[i];
		p->trips[i] = s->trips[i];
		p->trip_pages[i] = s->trip_pages[i];
	}
	__sync_fetch_and_add(&p->seq_end, 1);
}

/*
 * The slot's used pages reached the enforcer's level: one record, and a forced wake-up of
 * whoever blocks on the ring. On a new level at once; then at most every RTML_WAKE_EVERY_NS
 * while usage stays at or above it (the enforcer looks again, and may end another request).
 * Racing CPUs may both write one: a spare record costs the enforcer one look.
 */
static __always_inline void wake_enforcer(__u32 idx, struct rtml_slot *s, __u64 level, __u64 used)
{
	__u64 now = s->updated_ns;
	struct rtml_wake *e;

	if (used < level || (s->woken_pages == level && now - s->woken_ns < RTML_WAKE_EVERY_NS))
		return;
	s->woken_pages = level;
	s->woken_ns = now;
	e = bpf_ringbuf_reserve(&wake_events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&s->wakes_lost, 1);
		return;
	}
	__u64 id = bpf_get_current_pid_tgid();
	e->time_ns = now;
	e->cgroup_id = s->cgroup_id;
	e->used_pages = used;
	e->wake_pages = level;
	e->slot = idx;
	e->tid = (__u32)id;
	e->pid = id >> 32;
	e->_pad = 0;
	bpf_ringbuf_submit(e, RB_FORCE_WAKEUP);
	__sync_fetch_and_add(&s->wakes, 1);
}

/*
 * Rewrites the snapshot and re-evaluates every rule of one slot. Global (not
 * static): the verifier checks it once, not at every call site.
 */
__noinline int update_slot(__u32 idx, struct reading *r)
{
	struct rtml_slot *s = bpf_map_lookup_elem(&slots, &idx);
	struct rtml_config *cfg = bpf_map_lookup_elem(&configs, &idx);

	if (!s || !cfg || !r)
		return 0;

	__sync_fetch_and_add(&s->seq_begin, 1);
	s->usage_pages = r->usage;
	s->limit_pages = r->limit;
	s->headroom_pages = r->headroom;
	s->limit_depth = r->depth;
	s->high_pages = r->high;
	s->high_room_pages = r->high_room;
	s->high_depth = r->high_depth;
	s->updated_ns = bpf_ktime_get_ns();
	s->refreshes++;

	/*
	 * The ceiling fractions apply to: the lower of max and memory.high, so a rule
	 * trips before the kernel throttles the cgroup in reclaim, not after.
	 */
	__u64 ceiling = r->limit < r->high ? r->limit : r->high;
	__s64 room = r->headroom < r->high_room ? r->headroom : r->high_room;

	/*
	 * Usage as the tightest ancestor sees it: with no siblings it is our own
	 * usage, with busy siblings it is what is left of the shared ceiling.
	 */
	__s64 used = r->usage;
	if (ceiling < RTML_UNLIMITED_PAGES)
		used = (__s64)ceiling - room;
	if (used < 0)
		used = 0;
	__s64 ws = used - (cfg->inactive_file_base + s->inactive_file_delta);
	if (ws < 0)
		ws = 0;

#pragma unroll
	for (int i = 0; i < RTML_MAX_RULES; i++) {
		const struct rtml_rule *rule = &cfg->rules[i];
		if (rule->kind == RTML_RULE_OFF)
			continue;
		if (rule->kind == RTML_RULE_FRACTION && ceiling >= RTML_UNLIMITED_PAGES) {
			s->tripped[i] = 0;
			continue;
		}
		__u64 metric = rule->metric == RTML_METRIC_WORKING_SET ? ws : used;
		__u64 trip = rule_pages(rule, rule->trip, ceiling);
		s->trip_pages[i] = trip;
		if (metric >= trip) {
			if (!s->tripped[i]) {
				s->tripped[i] = 1;
				__sync_fetch_and_add(&s->trips[i], 1);
			}
		} else if (s->tripped[i] && metric < rule_pages(rule, rule->clear, ceiling)) {
			s->tripped[i] = 0;
		}
	}
	__sync_fetch_and_add(&s->seq_end, 1);
	/* the enforcer's wake: a compare while nobody set a level */
	__u64 wake_pages = cfg->wake_pages;
	if (wake_pages)
		wake_enforcer(idx, s, wake_pages, used);
	publish_page(idx, s, cfg);
	return 0;
}

/* A stat delta into its per-CPU charged / uncharged pair. */
static __always_inline void grow(__u64 *charged, __u64 *uncharged, long val)
{
	if (val > 0)
		*charged += val;
	else
		*uncharged -= val;
}

/*
 * Per-event bookkeeping for one watched slot; returns nonzero when the
 * snapshot must be rewritten. Counters are per-CPU: no atomics, no shared
 * cache line on the hot kernel path.
 */
static __always_inline int account(__u32 idx, int kind, long val, __u64 usage)
{
	struct rtml_counters *c = bpf_map_lookup_elem(&counters, &idx);
	struct rtml_slot *s = bpf_map_lookup_elem(&slots, &idx);
	int force = 0;

	if (!c || !s)
		return 0;
	c->events++;
	switch (kind) {
	case EV_ANON:
		grow(&c->anon_charged, &c->anon_uncharged, val);
		break;
	case EV_FILE:
		grow(&c->file_charged, &c->file_uncharged, val);
		break;
	case EV_KERNEL:
		grow(&c->kernel_charged, &c->kernel_uncharged, val);
		break;
	case EV_SOCK:
		grow(&c->sock_charged, &c->sock_uncharged, val);
		break;
	case EV_INACTIVE_FILE:
		__sync_fetch_and_add(&s->inactive_file_delta, val);
		force = 1;	/* the working set moved */
		break;
	case EV_FAULT:
		c->faults++;
		break;
	case EV_OOM:
		__sync_fetch_and_add(&s->oom_kills, 1);
		force = 1;
		break;
	}
	return force || s->usage_pages != usage;
}

/*
 * Per-request cost: a charge made by a registered thread inside a watched cgroup
 * goes to that thread's meter. One array lookup and a compare; events of other
 * threads stop at the compare.
 */
static __always_inline void meter_thread(long val)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u32 key = tid & (RTML_MAX_THREADS - 1);
	struct rtml_thread *t = bpf_map_lookup_elem(&threads, &key);

	if (!t || t->tid != tid)
		return;
	t->net_pages += val;
	if (val > 0)
		t->charged_pages += val;
	if (t->net_pages > t->peak_pages)
		t->peak_pages = t->net_pages;
}

static __always_inline struct rtml_ctl *active_ctl(void)
{
	__u32 zero = 0;
	struct rtml_ctl *c = bpf_map_lookup_elem(&ctl, &zero);

	if (!c || !c->nwatched)
		return 0;
	return c;
}

/*
 * Climb from the counter at level *at to the one at level depth (a watched cgroup), account
 * the event there and refresh its slot if the counter moved. Returns that counter.
 */
static __always_inline struct page_counter *refresh_hit(struct page_counter *pc, __u32 *at, __u32 idx,
							 __u32 depth, int kind, long val)
{
	struct walk w;

	for (int d = 0; d < RTML_WATCH_DEPTH && *at < depth && pc; d++) {
		pc = pc->parent;
		(*at)++;
	}
	if (!pc)
		return 0;
	__u64 usage = pc->usage.counter;
	if (account(idx, kind, val, usage)) {
		walk_init(&w, pc, usage);
		bpf_loop(RTML_LIMIT_DEPTH, limit_step, &w, 0);
		update_slot(idx, &w.r);
	}
	return pc;
}

/*
 * The lean set's fault step (RTML_CTL_FAULT_REFRESH: no memcg events, the fault hook refreshes
 * the slot itself). Reading the page counter there costs a helper call (its pointer comes
 * through container_of, which the verifier cannot type), and the counter moves in per-CPU
 * charge batches of 64 pages, so most reads find it where it was. Where one watched cgroup sits
 * above the fault's memcg and every level a verdict depends on (each rule's trip point, the wake
 * level) is more than RTML_FAULT_NEAR_PAGES away, a CPU reads the counter on one fault in
 * RTML_FAULT_STEP and only counts the others. That many faults, even 2 MiB THP ones, cannot carry
 * this CPU's charges across a level; other CPUs' charges are seen at most RTML_FAULT_STEP - 1
 * faults later (7 pages with 4 KiB faults: inside the kernel's own batch). Near a level, with a
 * rule tripped, or with nested watched cgroups, every fault reads, as before.
 */
#define RTML_FAULT_STEP 8
#define RTML_FAULT_NEAR_PAGES (RTML_FAULT_STEP * 512ULL)
#define RTML_FAULT_COUNTED (RTML_NESTED_WATCHES + 1)	/* watches_above: the fault was only counted */

/*
 * The usage of the slot's own counter below which no level is within RTML_FAULT_NEAR_PAGES of
 * its used pages (0: a rule is tripped, or a level is near). Levels are in used pages (usage as
 * the tightest ancestor sees it), which move one for one with the counter's own charges.
 */
static __always_inline __u64 quiet_below(__u32 idx)
{
	struct rtml_slot *s = bpf_map_lookup_elem(&slots, &idx);
	struct rtml_config *cfg = bpf_map_lookup_elem(&configs, &idx);

	if (!s || !cfg)
		return 0;
	/* used pages as update_slot counts them (the rules' metric is this, or less) */
	__u64 ceiling = s->limit_pages < s->high_pages ? s->limit_pages : s->high_pages;
	__s64 room = s->headroom_pages < s->high_room_pages ? s->headroom_pages : s->high_room_pages;
	__s64 used = s->usage_pages;
	if (ceiling < RTML_UNLIMITED_PAGES)
		used = (__s64)ceiling - room;
	if (used < 0)
		used = 0;
	__s64 dist = (__s64)RTML_UNLIMITED_PAGES;
#pragma unroll
	for (int i = 0; i < RTML_MAX_RULES; i++) {
		const struct rtml_rule *rule = &cfg->rules[i];
		if (rule->kind == RTML_RULE_OFF)
			continue;
		if (s->tripped[i])
			return 0;
		if (rule->kind == RTML_RULE_FRACTION && ceiling >= RTML_UNLIMITED_PAGES)
			continue;
		__s64 d = (__s64)rule_pages(rule, rule->trip, ceiling) - used;
		if (d < dist)
			dist = d;
	}
	if (cfg->wake_pages && (__s64)cfg->wake_pages - used < dist)
		dist = (__s64)cfg->wake_pages - used;
	__s64 q = (__s64)s->usage_pages + dist - (__s64)RTML_FAULT_NEAR_PAGES;
	return q > 0 ? q : 0;
}

/*
 * A fault this CPU may count without reading the counter: the cache entry of the fault's memcg
 * (key and generation checked by the caller) has skips left. Counted in the entry itself, a
 * cache line the fault touches anyway, and moved to the cgroup's counters at the next read or
 * refill (flush_pending); the counters' lines stay out of the fault's path. No memcg event
 * program is attached where faults step (they would refresh the slots instead), so nothing
 * refills the entry from interrupt context between the caller's check and these writes.
 */
static __always_inline int fault_skipped(struct watch_cache *wc)
{
	if (!wc->skip)
		return 0;
	wc->skip--;
	wc->pending++;
	return 1;
}

/* The entry's counted faults into its watched cgroup's counters (same watch map only). */
static __always_inline void flush_pending(struct watch_cache *wc, __u32 gen)
{
	__u32 idx = wc->idx[0];
	__u64 n = wc->pending;

	if (!n)
		return;
	wc->pending = 0;
	if (wc->gen != gen || wc->hits != 1)
		return;
	struct rtml_counters *c = bpf_map_lookup_elem(&counters, &idx);
	if (c) {
		c->events += n;
		c->faults += n;
	}
}

/*
 * The watched cgroups above the memcg whose css is given (its own included), into *out,
 * from this CPU's cache: events come in runs from one memcg, so a walk with a hash lookup
 * per level happens only on a miss. Both paths (memcg events and task hooks) share it.
 * The entry is copied, then its key checked again: an event in interrupt context (a socket
 * charge) may refill the cache for another memcg between our reads. Returns the number of
 * watched cgroups found (0: none, or unusable). An unwatched memcg (nearly every event of a
 * node) stops at its cache entry's hit count: no copy of the entry.
 */
static __always_inline int watches_above(struct cgroup_subsys_state *css, struct rtml_ctl *c,
					 struct watch_cache *out, int stepping)
{
	__u32 zero = 0;
	struct watch_cache *wc = bpf_map_lookup_elem(&wcache, &zero);
	struct cgroup *cg;

	if (!wc || !css)
		return 0;
	__u64 key = css->serial_nr;
	__u32 gen = c->gen;
	if (wc->id == key && wc->gen == gen) {
		if (!wc->hits)
			return 0;
		if (stepping && wc->hits == 1 && fault_skipped(wc))
			return RTML_FAULT_COUNTED;
		*out = *wc;
		return out->id == key && out->gen == gen ? out->hits : 0;
	}
	cg = css->cgroup;
	if (!cg)
		return 0;
	/* Miss: walk up, looking each level up in the watch map. */
	flush_pending(wc, gen);
	__u32 min_level = c->min_level;
	__u32 hits = 0;
	for (__u32 depth = 0; depth < RTML_WATCH_DEPTH && css; depth++) {
		struct cgroup *g = css->cgroup;
		if (!g || (__u32)g->level < min_level)
			break;
		__u64 gid = g->kn->id;
		__u32 *idx = bpf_map_lookup_elem(&watch, &gid);
		if (idx) {
			wc->idx[hits & (RTML_NESTED_WATCHES - 1)] = *idx;
			wc->depth[hits & (RTML_NESTED_WATCHES - 1)] = depth;
			if (++hits == RTML_NESTED_WATCHES)
				break;
		}
		css = css->parent;
	}
	wc->id = key;
	wc->gen = gen;
	wc->hits = hits;
	wc->skip = 0;
	wc->quiet_known = 0;
	if (!hits)
		return 0;
	*out = *wc;
	return out->id == key && out->gen == gen ? out->hits : 0;
}

/* Typed path: the memcg tracepoints hand us a struct mem_cgroup pointer. */
static __always_inline void on_memcg(struct mem_cgroup *memcg, int kind, long val)
{
	struct rtml_ctl *c = active_ctl();

	struct watch_cache w;
	__u32 hits;

	if (!c)
		return;
	hits = watches_above(&memcg->css, c, &w, 0);
	if (!hits)
		return;
	struct watch_cache *wc = &w;
	struct page_counter *pc = &memcg->memory;
	__u32 at = 0;

	/* Off until a process asks for the meter (admission): ~9 ns of each watched event. */
	if (kind >= EV_ANON && kind <= EV_SOCK && !(c->flags & RTML_CTL_METER_OFF))
		meter_thread(val);
	if (kind >= EV_ANON && kind <= EV_SOCK)
		meter_client_thread(val);	/* the agent's clients' threads (thread_pages.bpf.h) */

	/*
	 * Written out per hit, not as a loop: verifiers before ~6.4 reject a loop whose body ends
	 * in a call ("back-edge from insn N to N+1"), and each refresh ends in one.
	 */
	if (hits > 0)
		pc = refresh_hit(pc, &at, wc->idx[0], wc->depth[0], kind, val);
	if (hits > 1 && pc)
		pc = refresh_hit(pc, &at, wc->idx[1], wc->depth[1], kind, val);
	if (hits > 2 && pc)
		pc = refresh_hit(pc, &at, wc->idx[2], wc->depth[2], kind, val);
	if (hits > 3 && pc)
		refresh_hit(pc, &at, wc->idx[3], wc->depth[3], kind, val);
}

static __always_inline void refresh_task_hit(__u32 idx, struct page_counter *pc, int kind, int refresh)
{
	struct walk w;
	__u64 usage = refresh ? BPF_CORE_READ(pc, usage.counter) : 0;

	if (!account(idx, kind, 0, usage) || !refresh)
		return;
	walk_init(&w, pc, usage);
	bpf_loop(RTML_LIMIT_DEPTH, limit_step_probe, &w, 0);
	update_slot(idx, &w.r);
}

/*
 * A fault that reads the counter, with one watched cgroup above its memcg: refresh_task_hit,
 * then how many of the next faults this CPU may only count. The quiet level is worked out again
 * when the counter moved (the slot was rewritten) or the cache entry is new.
 */
static __always_inline void fault_refresh(const struct watch_cache *w, struct page_counter *pc)
{
	__u32 zero = 0, idx = w->idx[0];
	struct watch_cache *wc = bpf_map_lookup_elem(&wcache, &zero);
	struct walk wk;
	__u64 usage = BPF_CORE_READ(pc, usage.counter);
	int moved = account(idx, EV_FAULT, 0, usage);

	if (moved) {
		walk_init(&wk, pc, usage);
		bpf_loop(RTML_LIMIT_DEPTH, limit_step_probe, &wk, 0);
		update_slot(idx, &wk.r);
	}
	if (!wc || wc->id != w->id || wc->gen != w->gen)
		return;
	flush_pending(wc, w->gen);
	if (moved || !wc->quiet_known) {
		wc->quiet = quiet_below(idx);
		wc->quiet_known = 1;
	}
	wc->skip = usage < wc->quiet ? RTML_FAULT_STEP - 1 : 0;
}

/* From a css, climb to the one at level ``depth`` above the start (*at counts the levels so far). */
static __always_inline struct cgroup_subsys_state *climb(struct cgroup_subsys_state *css, __u32 *at, __u32 depth)
{
	for (int d = 0; d < RTML_WATCH_DEPTH && *at < depth && css; d++) {
		css = css->parent;
		(*at)++;
	}
	return css;
}

/* Task path: fault and OOM hooks find the memcg through the task's css_set. */
static __always_inline void on_task(struct task_struct *task, int kind)
{
	struct rtml_ctl *c = active_ctl();
	struct cgroup_subsys_state *css;
	struct watch_cache w;

	if (!c || !task)
		return;
	css = task->cgroups->subsys[bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id)];
	/* With memcg events live they keep the slot fresh: a fault is only counted. */
	int refresh = kind == EV_OOM || (c->flags & RTML_CTL_FAULT_REFRESH);
	int stepping = kind == EV_FAULT && refresh;
	__u32 hits = watches_above(css, c, &w, stepping);
	if (!hits)
		return;
	/* Without memcg events a fault is the only charge we see: one page to the thread. */
	if (kind == EV_FAULT && (c->flags & (RTML_CTL_FAULT_REFRESH | RTML_CTL_METER_OFF)) == RTML_CTL_FAULT_REFRESH)
		meter_thread(1);
	if (kind == EV_FAULT && (c->flags & RTML_CTL_FAULT_REFRESH))
		meter_client_thread(1);	/* the agent's clients' threads (thread_pages.bpf.h) */
	if (hits == RTML_FAULT_COUNTED)
		return;
	struct watch_cache *wc = &w;
	/* &memcg->memory from &memcg->css, by CO-RE offsets */
	long delta = (long)bpf_core_field_offset(struct mem_cgroup, memory) -
		     (long)bpf_core_field_offset(struct mem_cgroup, css);
	__u32 at = 0;
	if (stepping && hits == 1) {
		css = climb(css, &at, wc->depth[0]);
		if (css)
			fault_refresh(wc, (struct page_counter *)((long)css + delta));
		return;
	}
	/* written out per hit: see on_memcg */
	if (hits > 0) {
		css = climb(css, &at, wc->depth[0]);
		if (css)
			refresh_task_hit(wc->idx[0], (struct page_counter *)((long)css + delta), kind, refresh);
	}
	/* the fault happened in the nearest watched cgroup: count it there only */
	kind = kind == EV_OOM ? kind : EV_NONE;
	if (hits > 1 && css) {
		css = climb(css, &at, wc->depth[1]);
		if (css)
			refresh_task_hit(wc->idx[1], (struct page_counter *)((long)css + delta), kind, refresh);
	}
	if (hits > 2 && css) {
		css = climb(css, &at, wc->depth[2]);
		if (css)
			refresh_task_hit(wc->idx[2], (struct page_counter *)((long)css + delta), kind, refresh);
	}
	if (hits > 3 && css) {
		css = climb(css, &at, wc->depth[3]);
		if (css)
			refresh_task_hit(wc->idx[3], (struct page_counter *)((long)css + delta), kind, refresh);
	}
}

SEC("tp_btf/mod_memcg_lruvec_state")
int BPF_PROG(handle_memcg_lruvec, struct mem_cgroup *memcg, int item, int val)
{
	int kind = EV_NONE;

	if (item == bpf_core_enum_value(enum node_stat_item, NR_INACTIVE_FILE))
		kind = EV_INACTIVE_FILE;
	else if (item == bpf_core_enum_value(enum node_stat_item, NR_ANON_MAPPED))
		kind = EV_ANON;
	else if (item == bpf_core_enum_value(enum node_stat_item, NR_FILE_PAGES))
		kind = EV_FILE;
	on_memcg(memcg, kind, val);
	return 0;
}

SEC("tp_btf/mod_memcg_state")
int BPF_PROG(handle_memcg_state, struct mem_cgroup *memcg, int item, int val)
{
	int kind = EV_NONE;

	if (item == bpf_core_enum_value(enum memcg_stat_item, MEMCG_KMEM))
		kind = EV_KERNEL;
	else if (item == bpf_core_enum_value(enum memcg_stat_item, MEMCG_SOCK))
		kind = EV_SOCK;
	on_memcg(memcg, kind, val);
	return 0;
}

/* The BTF raw form: about a quarter of the classic tracepoint's cost per fault. */
SEC("tp_btf/page_fault_user")
int BPF_PROG(handle_page_fault, unsigned long address, struct pt_regs *regs, unsigned long error_code)
{
	on_task(bpf_get_current_task_btf(), EV_FAULT);
	return 0;
}

/*
 * Large folios for the fault-counting meter. Without the memcg tracepoints (before 6.13, or the
 * lean set) a metered thread's charges are seen as one page per user fault, but one fault may
 * map a whole transparent huge page (order 9: 2 MiB, where THP is "always" or asked for with
 * MADV_HUGEPAGE) or, since 6.8, a smaller multi-size THP folio: a 64 MiB bytearray was metered
 * as 33 pages. The page allocator's tracepoint sees the folio's order in the faulting thread,
 * after the fault hook counted its one page; the other (1 << order) - 1 go to the same meters,
 * on the same conditions (a registered thread in a watched cgroup, the fault-counting set live).
 * Only movable allocations are user pages (anonymous and page-cache folios; slab, page tables
 * and kernel stacks are not movable). A huge page whose memcg charge then fails is counted once:
 * its 2 MiB range falls back to small pages, which never ask for a huge one there again. A huge
 * page migrated by NUMA balancing in the thread's hinting fault counts as a new one.
 */
#define RTML_FOLIO_MAX_ORDER 9		/* HPAGE_PMD_ORDER with 4 KiB pages (the fault hook is x86 only) */
#define RTML_GFP_MOVABLE 0x08u		/* ___GFP_MOVABLE: bit 3 since 2.6 (an enum bit since 6.10, same value) */

/* The current thread has a meter: the library's (threads) or an agent client's (tmeters). */
static __always_inline int thread_metered(int lib, int clients)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;

	if (lib) {
		__u32 key = tid & (RTML_MAX_THREADS - 1);
		struct rtml_thread *t = bpf_map_lookup_elem(&threads, &key);
		if (t && t->tid == tid)
			return 1;
	}
	if (clients) {
		struct rtml_tref *ref = bpf_map_lookup_elem(&tmeters, &tid);
		if (ref && ref->tgid == (__u32)(pid_tgid >> 32))
			return 1;
	}
	return 0;
}

/*
 * The current task's memcg is watched, or sits below a watched cgroup (the fault hook meters only
 * there). A walk of its own, once per large folio of a metered thread: not through the per-CPU
 * cache, which this program, run from an interrupt on top of the fault hook, must not refill
 * between that hook's check and its writes (fault_skipped).
 */
static __always_inline int task_watched(const struct rtml_ctl *c)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct cgroup_subsys_state *css =
		task->cgroups->subsys[bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id)];
	__u32 min_level = c->min_level;

	for (int depth = 0; depth < RTML_WATCH_DEPTH && css; depth++) {
		struct cgroup *g = css->cgroup;
		if (!g || (__u32)g->level < min_level)
			return 0;
		__u64 gid = g->kn->id;
		if (bpf_map_lookup_elem(&watch, &gid))
			return 1;
		css = css->parent;
	}
	return 0;
}

/* Every page allocation of the node comes here: order 0, nearly all of them, leaves at the first compare. */
SEC("tp_btf/mm_page_alloc")
int BPF_PROG(handle_page_alloc, struct page *page, unsigned int order, gfp_t gfp_flags, int migratetype)
{
	__u32 zero = 0;

	if (order - 1 >= RTML_FOLIO_MAX_ORDER)	/* order 0, or past a PMD: one unsigned compare */
		return 0;
	struct rtml_ctl *c = active_ctl();
	if (!c || !(c->flags & RTML_CTL_FAULT_REFRESH))	/* the memcg events meter charges at their size */
		return 0;
	__u32 *n = bpf_map_lookup_elem(&tmeter_n, &zero);
	int lib = !(c->flags & RTML_CTL_METER_OFF);
	int clients = n && *n;
	if ((!lib && !clients) || !page || !(gfp_flags & RTML_GFP_MOVABLE))
		return 0;
	if (!thread_metered(lib, clients) || !task_watched(c))
		return 0;
	long more = (1L << order) - 1;
	if (lib)
		meter_thread(more);
	if (clients)
		meter_client_thread(more);
	return 0;
}

/*
 * One mm counter of the victim: a per-CPU counter's shared count since 6.2 (off by at most
 * its batches), an atomic before (a kernel with the 6.8 hook backported, as Debian's 6.1).
 */
static __always_inline __u64 mm_pages(unsigned long mm, int idx)
{
	s64 v = 0;
	unsigned long at;

	if (bpf_core_type_exists(struct mm_rss_stat))
		at = mm + bpf_core_field_offset(struct mm_struct___old, rss_stat) + idx * sizeof(long);
	else
		at = mm + bpf_core_field_offset(struct mm_struct, rss_stat) +
		     idx * bpf_core_type_size(struct percpu_counter) +
		     bpf_core_field_offset(struct percpu_counter, count);
	bpf_probe_read_kernel(&v, sizeof(v), (void *)at);
	return v > 0 ? v : 0;
}

/*
 * Fills an OOM event: who, where (the path by names, leaf first, walked up the memory
 * css), and the cgroup on that path with the least room, which is the one that ran out.
 * Rare: helper reads throughout, cost does not matter here.
 */
static __always_inline void emit_oom(struct task_struct *task)
{
	__u32 zero = 0;
	struct rtml_oom_event *e = bpf_ringbuf_reserve(&oom_events, sizeof(*e), 0);

	if (!e) {
		struct rtml_ctl *c = bpf_map_lookup_elem(&ctl, &zero);
		if (c)
			__sync_fetch_and_add(&c->events_lost, 1);
		return;
	}
	e->time_ns = bpf_ktime_get_ns();
	e->pid = BPF_CORE_READ(task, tgid);
	e->tid = BPF_CORE_READ(task, pid);
	e->flags = 0;
	e->_pad = 0;
	bpf_probe_read_kernel_str(e->comm, sizeof(e->comm), task->comm);
	unsigned long mm = (unsigned long)BPF_CORE_READ(task, mm);
	e->rss_anon_pages = mm ? mm_pages(mm, RTML_MM_ANONPAGES) : 0;
	e->rss_file_pages = mm ? mm_pages(mm, RTML_MM_FILEPAGES) : 0;
	e->rss_shmem_pages = mm ? mm_pages(mm, RTML_MM_SHMEMPAGES) : 0;

	struct cgroup_subsys_state *css =
		BPF_CORE_READ(task, cgroups, subsys[bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id)]);
	long delta = (long)bpf_core_field_offset(struct mem_cgroup, memory) -
		     (long)bpf_core_field_offset(struct mem_cgroup, css);
	__s64 least = (__s64)RTML_UNLIMITED_PAGES;
	e->cgroup_id = css ? BPF_CORE_READ(css, cgroup, kn, id) : 0;
	e->limit_cgroup_id = 0;
	e->limit_depth = 0;
	e->limit_pages = RTML_UNLIMITED_PAGES;
	e->usage_pages = css ? BPF_CORE_READ((struct page_counter *)((long)css + delta), usage.counter) : 0;
	e->levels = 0;
	for (int i = 0; i < RTML_EVENT_DEPTH; i++) {
		if (!css)
			break;
		struct cgroup_subsys_state *parent = BPF_CORE_READ(css, parent);
		if (!parent)
			break; /* the root has no name of its own */
		const char *name = BPF_CORE_READ(css, cgroup, kn, name);
		if (bpf_probe_read_kernel_str(e->names[i], RTML_EVENT_NAME, name) >= RTML_EVENT_NAME)
			e->flags |= RTML_EVENT_NAME_CUT;
		struct page_counter *pc = (struct page_counter *)((long)css + delta);
		__u64 max = BPF_CORE_READ(pc, max);
		if (max < RTML_UNLIMITED_PAGES) {
			__s64 usage = BPF_CORE_READ(pc, usage.counter);
			if ((__s64)max - usage < least) {
				least = (__s64)max - usage;
				e->limit_cgroup_id = BPF_CORE_READ(css, cgroup, kn, id);
				e->limit_pages = max;
				e->usage_pages = usage;
				e->limit_depth = i;
			}
		}
		e->levels = i + 1;
		css = parent;
	}
	if (css && BPF_CORE_READ(css, parent))
		e->flags |= RTML_EVENT_TRUNCATED;
	bpf_ringbuf_submit(e, 0);
}

SEC("tp_btf/mark_victim")
int BPF_PROG(handle_oom_victim, struct task_struct *task)
{
	if (task)
		emit_oom(task);
	on_task(task, EV_OOM);
	return 0;
}

/* -- the node agent's programs (not loaded by a library process) -------------------- */

static int on_beat(void *map, __u32 *key, struct ticker *t)
{
	__u32 zero = 0;
	struct rtml_beat *b = bpf_map_lookup_elem(&beat, &zero);

	if (b) {
		b->beat_ns = bpf_ktime_get_ns();
		b->beats++;
		b->abi_version = RTML_ABI_VERSION;
		b->period_ms = RTML_BEAT_MS;
	}
	bpf_timer_start(&t->timer, RTML_BEAT_MS * 1000000ULL, 0);
	return 0;
}

/*
 * Run by the agent with BPF_PROG_TEST_RUN: copies one slot into its page after user space
 * wrote the slot (a first reading, an upkeep, a rule closed), since the frozen page takes
 * writes from programs only; retires a freed slot's page; and (re)starts the beat timer
 * (init fails harmlessly with -EBUSY when another agent's run already made it).
 */
SEC("syscall")
int rtml_publish(struct rtml_publish_args *args)
{
	__u32 zero = 0;
	__u32 idx = args->slot;

	if (args->flags & RTML_PUBLISH_START_BEAT) {
		struct ticker *t = bpf_map_lookup_elem(&ticker, &zero);
		if (t) {
			bpf_timer_init(&t->timer, &ticker, CLOCK_MONOTONIC);
			bpf_timer_set_callback(&t->timer, on_beat);
			bpf_timer_start(&t->timer, 0, 0);
		}
	}
	if (args->flags & RTML_PUBLISH_RETIRE) {
		/* clients check cgroup_id against their own: a retired page is never read as live */
		void *inner = bpf_map_lookup_elem(&pages, &idx);
		struct rtml_slot *p = inner ? bpf_map_lookup_elem(inner, &zero) : 0;
		if (p) {
			__sync_fetch_and_add(&p->seq_begin, 1);
			p->cgroup_id = 0;
			__sync_fetch_and_add(&p->seq_end, 1);
		}
		return 0;
	}
	struct rtml_slot *s = bpf_map_lookup_elem(&slots, &idx);
	struct rtml_config *cfg = bpf_map_lookup_elem(&configs, &idx);
	if (s && cfg)
		publish_page(idx, s, cfg);
	return 0;
}
