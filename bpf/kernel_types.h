/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * kernel_types.h - the few kernel types rtml.bpf.c touches, and nothing else.
 *
 * We do not generate vmlinux.h from the build host: the object must load on
 * any kernel with BTF. Every struct is marked preserve_access_index, so clang
 * records each field access as a CO-RE relocation and libbpf rewrites the
 * offsets against the running kernel's BTF at load time. Only the fields we
 * read are declared; their order and the padding here do not matter.
 * Enum values are placeholders: the program reads them through
 * bpf_core_enum_value(), so the running kernel's numbers are used.
 */
#ifndef __RTML_KERNEL_TYPES_H
#define __RTML_KERNEL_TYPES_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef __u32 u32;
typedef __u64 u64;
typedef __s64 s64;
typedef int pid_t;
typedef unsigned int uid_t;
typedef _Bool bool;
typedef unsigned int gfp_t;
#define true 1
#define false 0

enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_ARRAY_OF_MAPS = 12,
	BPF_MAP_TYPE_RINGBUF = 27,
};

/* uapi: opaque to programs, 16 bytes, 8-aligned */
struct bpf_timer {
	__u64 __opaque[2];
} __attribute__((aligned(8)));

#define CLOCK_MONOTONIC 1

enum {
	BPF_ANY = 0,
	BPF_F_MMAPABLE = (1U << 10),
};

#pragma clang attribute push (__attribute__((preserve_access_index)), apply_to = record)

typedef struct {
	long counter;
} atomic_long_t;

struct page_counter {
	atomic_long_t usage;
	unsigned long high;	/* memory.high (v2); PAGE_COUNTER_MAX where unset and on v1 (5.8+) */
	unsigned long max;
	struct page_counter *parent;
};

struct kernfs_node {
	u64 id;
	const char *name;
};

struct cgroup_subsys_state;

struct cgroup {
	struct kernfs_node *kn;
	int level;
};

struct cgroup_subsys_state {
	struct cgroup *cgroup;
	u64 serial_nr;		/* unique for the boot: css_serial_nr_next++ */
	struct cgroup_subsys_state *parent;
};

struct mem_cgroup {
	struct cgroup_subsys_state css;
	struct page_counter memory;
};

struct css_set {
	struct cgroup_subsys_state *subsys[16];
};

/* 6.2+: one per-CPU counter per mm counter (the OOM hook needs 6.8 anyway) */
struct percpu_counter {
	s64 count;
};

struct mm_struct {
	struct percpu_counter rss_stat[4];
};

/* before 6.2: plain atomic counters */
struct mm_rss_stat {
	atomic_long_t count[4];
};

struct mm_struct___old {
	struct mm_rss_stat rss_stat;
};

struct task_struct {
	struct css_set *cgroups;
	struct mm_struct *mm;
	pid_t pid;
	pid_t tgid;
	char comm[16];
};

struct pt_regs;
struct page;	/* mm_page_alloc's first argument: only compared with NULL */

#pragma clang attribute pop

enum node_stat_item {
	NR_INACTIVE_FILE = 2,
	NR_ANON_MAPPED = 17,
	NR_FILE_PAGES = 19,
};

enum memcg_stat_item {
	MEMCG_SOCK = 52,
	MEMCG_KMEM = 55,
};

/* mm counter indices: an anonymous enum in the kernel (no CO-RE name), unchanged since 4.x */
#define RTML_MM_FILEPAGES 0
#define RTML_MM_ANONPAGES 1
#define RTML_MM_SHMEMPAGES 3

enum cgroup_subsys_id {
	memory_cgrp_id = 4,
};

#endif /* __RTML_KERNEL_TYPES_H */
