// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Empty programs on rtml's memcg hooks: the floor any BPF program on them costs. */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tp_btf/mod_memcg_lruvec_state")
int floor_lruvec(void *ctx)
{
	return 0;
}

SEC("tp_btf/mod_memcg_state")
int floor_state(void *ctx)
{
	return 0;
}

/* The lean set's one event per fault: the BTF raw page_fault_user. */
SEC("tp_btf/page_fault_user")
int floor_fault(void *ctx)
{
	return 0;
}

/* The lean set's page allocator hook (huge pages for the meter): about one allocation per fault. */
SEC("tp_btf/mm_page_alloc")
int floor_alloc(void *ctx)
{
	return 0;
}
