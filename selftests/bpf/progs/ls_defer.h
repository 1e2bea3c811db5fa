/* SPDX-License-Identifier: GPL-2.0 */
/* Shared by the ls_defer_* BPF programs. Include after vmlinux.h. */
#ifndef __PROGS_LS_DEFER_H
#define __PROGS_LS_DEFER_H

#include <bpf/bpf_helpers.h>
#include "lsdefer_testmod.h"
#include "ls_defer_common.h"
#include "ls_errno.h"

/*
 * Same layout as struct ls_defer_uval. obj is a referenced kptr: __kptr,
 * spelled out for checkpatch, which takes "__kptr *obj" for a product.
 */
struct ls_defer_val {
	__u64 canary;
	struct lsdefer_obj __attribute__((btf_type_tag("kptr"))) *obj;
	__u64 pad[LS_DEFER_PAD];
};

struct task_struct *bpf_task_from_pid(s32 pid) __ksym;
void bpf_task_release(struct task_struct *p) __ksym;
struct cgroup *bpf_cgroup_from_id(u64 cgid) __ksym;
void bpf_cgroup_release(struct cgroup *cgrp) __ksym;

static __always_inline int ls_rc_bucket(long rc)
{
	switch (rc) {
	case 0:
		return LS_RC_OK;
	case -ENOENT:
		return LS_RC_ENOENT;
	case -EOPNOTSUPP:
		return LS_RC_EOPNOTSUPP;
	case -EDEADLK:
	case -ETIMEDOUT:
	case -EBUSY:
		return LS_RC_BUSY;
	default:
		return LS_RC_OTHER;
	}
}

static __always_inline void ls_count(__u64 *hist, __s64 *other_err, long rc)
{
	int b = ls_rc_bucket(rc);

	if (b == LS_RC_OTHER)
		*other_err = rc;
	if (b >= 0 && b < LS_RC_NR)
		__sync_fetch_and_add(&hist[b], 1);
}

/* Put a fresh object into v->obj, destroying the one it replaces. */
static __always_inline int ls_put_obj(struct ls_defer_val *v)
{
	struct lsdefer_obj *obj, *old;

	obj = bpf_lsdefer_obj_new();
	if (!obj)
		return -ENOMEM;
	old = bpf_kptr_xchg(&v->obj, obj);
	if (old)
		bpf_lsdefer_obj_release(old);
	return 0;
}

/* A value with a fresh object: counted in st */
static __always_inline void ls_fill(struct ls_defer_stats *st, struct ls_defer_val *v)
{
	if (!v) {
		__sync_fetch_and_add(&st->create_fail, 1);
		return;
	}
	if (ls_put_obj(v)) {
		__sync_fetch_and_add(&st->obj_fail, 1);
		return;
	}
	v->canary = LS_DEFER_CANARY;
	__sync_fetch_and_add(&st->created, 1);
}

#endif /* __PROGS_LS_DEFER_H */
