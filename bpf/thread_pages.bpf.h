/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * thread_pages.bpf.h - the per-thread meters the node agent lends its unprivileged clients
 * (see the "client thread meters" block of rtml.h). Included by rtml.bpf.c; one call at
 * the charge hook. A node without such clients pays one array lookup and a compare.
 */
#ifndef __RTML_THREAD_PAGES_BPF_H
#define __RTML_THREAD_PAGES_BPF_H

struct tpage_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__uint(value_size, sizeof(struct rtml_tpage));	/* a size, not a type: clang emits only a forward of it */
};

struct tbegin_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__uint(value_size, sizeof(struct rtml_tbegin));
};

/* Slot -> the client cgroup's meter page (frozen), where the agent made one. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, RTML_MAX_SLOTS);
	__type(key, __u32);
	__array(values, struct tpage_map);
} tpages SEC(".maps");

/* Slot -> the client cgroup's begin page (the client's). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, RTML_MAX_SLOTS);
	__type(key, __u32);
	__array(values, struct tbegin_map);
} tbegins SEC(".maps");

/* Host tid -> its entry; the agent's only (a library process leaves it empty and small). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct rtml_tref);
} tmeters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} tmeter_n SEC(".maps");

/*
 * A charge (+) or uncharge (-) made by the current thread: to its entry, if the agent
 * registered it. A new allocation (gen) starts the entry from zero; a new begin number
 * restarts its peak from the net before this charge (the net when the client began).
 */
static __always_inline void meter_client_thread(long val)
{
	__u32 zero = 0;
	__u32 *n = bpf_map_lookup_elem(&tmeter_n, &zero);

	if (!n || !*n)
		return;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	struct rtml_tref *ref = bpf_map_lookup_elem(&tmeters, &tid);
	if (!ref || ref->tgid != (__u32)(pid_tgid >> 32))
		return;
	__u32 slot = ref->slot;
	__u32 i = ref->entry & (RTML_TPAGE_ENTRIES - 1);
	__u32 gen = ref->gen;
	void *inner = bpf_map_lookup_elem(&tpages, &slot);
	struct rtml_tpage *p = inner ? bpf_map_lookup_elem(inner, &zero) : 0;
	if (!p)
		return;
	void *binner = bpf_map_lookup_elem(&tbegins, &slot);
	struct rtml_tbegin *b = binner ? bpf_map_lookup_elem(binner, &zero) : 0;
	__u64 epoch = b ? *(volatile __u64 *)&b->epoch[i] : 0;
	struct rtml_tentry *e = &p->e[i];

	if (e->gen != gen) {
		e->tid = tid;
		e->net_pages = 0;
		e->peak_pages = 0;
		e->epoch = epoch;
		e->gen = gen;
	} else if (e->epoch != epoch) {
		e->peak_pages = e->net_pages;
		e->epoch = epoch;
	}
	e->net_pages += val;
	if (e->net_pages > e->peak_pages)
		e->peak_pages = e->net_pages;
}

#endif /* __RTML_THREAD_PAGES_BPF_H */
