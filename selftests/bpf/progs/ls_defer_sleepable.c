// SPDX-License-Identifier: GPL-2.0
/*
 * A sleepable program holds a local storage value across a sleep while user
 * space deletes the element: the value, and the object its kptr holds, must
 * stay until the program is done. And storm: many deletes on one CPU while
 * such a program holds the grace period. Used by
 * prog_tests/ls_defer_sleepable.c.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "ls_defer.h"

char _license[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ls_defer_val);
} task_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_CGRP_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ls_defer_val);
} cgrp_map SEC(".maps");

/*
 * Same value size, hence same slab cache: user space fills these with
 * LS_DEFER_CHURN values to reuse memory freed too early.
 */
#define CHURN_MAP(n)						\
struct {							\
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);		\
	__uint(map_flags, BPF_F_NO_PREALLOC);			\
	__type(key, int);					\
	__type(value, struct ls_defer_val);			\
} churn_##n SEC(".maps")

CHURN_MAP(0);
CHURN_MAP(1);
CHURN_MAP(2);
CHURN_MAP(3);
CHURN_MAP(4);
CHURN_MAP(5);
CHURN_MAP(6);
CHURN_MAP(7);

/* storm's: one element at a time, created and deleted; no special fields */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} storm_map SEC(".maps");

/* blocks bpf_copy_from_user() for as long as user space wants */
void *fault_addr;
u64 cgid;

int stage;		/* 1: holds the value, about to sleep; 2: woke up */
int err;
u64 obj_id;		/* the object put in the value before the sleep */
u64 canary_after;	/* the value's canary after the sleep */
u64 old_id;		/* the object found in the value after the sleep */
int old_missing;	/* ... none: its fields were freed under us */
int new_obj_fail;
u64 dtor_at_resume;	/* destructor count when the program woke up */
u64 seq_resume;		/* event clock when the program woke up */

u32 storm_loops;	/* set by user space: create + delete pairs per run */
u64 storm_deleted;	/* deletes that returned 0 */
u64 storm_create_fail;	/* storage_get(F_CREATE) returned NULL */
u64 storm_delete_fail;
s64 storm_delete_err;	/* the last delete error */

static __always_inline int hold_and_sleep(struct ls_defer_val *v)
{
	struct lsdefer_obj *obj, *old;
	char dst;

	if (!v)
		return 2;
	obj = bpf_lsdefer_obj_new();
	if (!obj)
		return 3;
	obj_id = obj->id;
	old = bpf_kptr_xchg(&v->obj, obj);
	if (old)
		bpf_lsdefer_obj_release(old);
	v->canary = LS_DEFER_CANARY;
	stage = 1;

	/* user space deletes the element while we sleep here */
	bpf_copy_from_user(&dst, sizeof(dst), fault_addr);

	stage = 2;
	dtor_at_resume = bpf_lsdefer_counter(LSDEFER_CNT_DTOR);
	seq_resume = bpf_lsdefer_seq();
	canary_after = v->canary;
	/*
	 * The element is deleted, but until a Tasks Trace grace period has
	 * passed its fields are not freed: our object must still be there,
	 * and a new one stored now must be freed with the value.
	 */
	obj = bpf_lsdefer_obj_new();
	if (!obj) {
		new_obj_fail = 1;
		return 0;
	}
	old = bpf_kptr_xchg(&v->obj, obj);
	if (old) {
		old_id = old->id;
		bpf_lsdefer_obj_release(old);
	} else {
		old_missing = 1;
	}
	return 0;
}

SEC("syscall")
int read_task(void *ctx)
{
	struct task_struct *task = bpf_get_current_task_btf();

	err = hold_and_sleep(bpf_task_storage_get(&task_map, task, 0,
						  BPF_LOCAL_STORAGE_GET_F_CREATE));
	return 0;
}

SEC("syscall")
int read_cgrp(void *ctx)
{
	struct cgroup *cgrp;

	cgrp = bpf_cgroup_from_id(cgid);
	if (!cgrp) {
		err = 1;
		return 0;
	}
	err = hold_and_sleep(bpf_cgrp_storage_get(&cgrp_map, cgrp, 0,
						  BPF_LOCAL_STORAGE_GET_F_CREATE));
	bpf_cgroup_release(cgrp);
	return 0;
}

/* One element of the current task's storage: created, then deleted */
static int storm_one(u32 i, void *ctx)
{
	struct task_struct *task = bpf_get_current_task_btf();
	__u64 *v;
	long rc;

	v = bpf_task_storage_get(&storm_map, task, 0,
				 BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!v) {
		storm_create_fail++;
		return 0;
	}
	*v = i;
	/* the task's only element: its storage goes with it */
	rc = bpf_task_storage_delete(&storm_map, task);
	if (rc) {
		storm_delete_fail++;
		storm_delete_err = rc;
		return 0;
	}
	storm_deleted++;
	return 0;
}

/* storm_loops create + delete pairs, all on the CPU the caller runs on */
SEC("syscall")
int storm(void *ctx)
{
	return bpf_loop(storm_loops, storm_one, NULL, 0);
}
