/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shared by the ls_defer_* BPF programs and their prog_tests: what the
 * programs count. Fixed-size types only.
 */
#ifndef __LS_DEFER_COMMON_H
#define __LS_DEFER_COMMON_H

/* How a delete (or create) ended, see ls_rc_bucket() */
enum ls_defer_rc {
	LS_RC_OK,
	LS_RC_ENOENT,		/* nothing to delete: another context was first */
	LS_RC_EOPNOTSUPP,	/* the 7.3 refusal in NMI */
	LS_RC_BUSY,		/* rqspinlock: -EDEADLK (NMI on a holder), -ETIMEDOUT */
	LS_RC_OTHER,
	LS_RC_NR,
};

/* One set per program (or context) that deletes */
struct ls_defer_stats {
	__u64 runs;		/* runs for the target process */
	__u64 foreign;		/* runs that found another process current */
	__u64 in_nmi;		/* runs where bpf_lsdefer_ctx() said NMI */
	__u64 in_hardirq;	/* ... hard interrupt, not NMI */
	__u64 arg_nmi;		/* runs whose in_nmi argument was set (fentry) */
	__u64 in_task_del;	/* runs that interrupted a task-context delete */
	__u64 task_del[LS_RC_NR];
	__u64 cgrp_del[LS_RC_NR];
	__u64 created;		/* values (re)created with a fresh object */
	__u64 create_fail;	/* storage_get(F_CREATE) returned NULL */
	__u64 obj_fail;		/* bpf_lsdefer_obj_new() returned NULL */
	__s64 other_err;	/* last error counted as LS_RC_OTHER */
};

#define LS_DEFER_CANARY		0x43616e6172792121ULL
#define LS_DEFER_CHURN		0x5a5a5a5a5a5a5a5aULL
#define LS_DEFER_PAD		6
/* Power of two: CPUs that mark their task-context deletes (in_task_del) */
#define LS_DEFER_MAX_CPUS	64

/* User space view of a value; the programs' has a kptr in place of obj. */
struct ls_defer_uval {
	__u64 canary;
	__u64 obj;
	__u64 pad[LS_DEFER_PAD];
};

#endif /* __LS_DEFER_COMMON_H */
