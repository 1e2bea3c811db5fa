// SPDX-License-Identifier: GPL-2.0
/*
 * Create and delete task and cgroup local storage in maps that user space
 * swaps in through map-in-map slots, so that a map can be freed as soon as
 * user space lets it go, right after deletes from programs and syscalls.
 * SEC("syscall") hold sleeps in a Tasks Trace RCU read-side critical section
 * for as long as user space wants, so that no Tasks Trace grace period can
 * end meanwhile. Used by prog_tests/ls_defer_map_free.c.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "ls_defer.h"

char _license[] SEC("license") = "GPL";

#define NR_SLOTS	4
/* Slots below this are deleted by the program, the others by syscalls */
#define PROG_SLOTS	2

/* Templates of the per-round maps user space creates */
struct inner_task_map {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ls_defer_val);
} inner_task SEC(".maps");

struct inner_cgrp_map {
	__uint(type, BPF_MAP_TYPE_CGRP_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ls_defer_val);
} inner_cgrp SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, NR_SLOTS);
	__type(key, int);
	__array(values, struct inner_task_map);
} outer_task SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, NR_SLOTS);
	__type(key, int);
	__array(values, struct inner_cgrp_map);
} outer_cgrp SEC(".maps");

enum { MODE_OFF, MODE_CREATE, MODE_DELETE };

int target_tgid;
int mode;
/* Only this syscall triggers the program */
long trigger_nr = -1;

struct ls_defer_stats create_st;
struct ls_defer_stats delete_st;

/* hold blocks in bpf_copy_from_user() for as long as user space wants */
void *fault_addr;

SEC("syscall")
int hold(void *ctx)
{
	char dst;

	bpf_copy_from_user(&dst, sizeof(dst), fault_addr);
	return 0;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(sys_enter_round, struct pt_regs *regs, long id)
{
	struct task_struct *task;
	struct ls_defer_val *v;
	struct cgroup *cgrp;
	void *tmap, *cmap;
	int i, m = mode;
	long rc;

	if (m == MODE_OFF || id != trigger_nr)
		return 0;
	task = bpf_get_current_task_btf();
	if (task->tgid != target_tgid)
		return 0;
	cgrp = task->cgroups->dfl_cgrp;

	if (m == MODE_CREATE)
		__sync_fetch_and_add(&create_st.runs, 1);
	else
		__sync_fetch_and_add(&delete_st.runs, 1);

	for (i = 0; i < NR_SLOTS; i++) {
		int key = i;

		tmap = bpf_map_lookup_elem(&outer_task, &key);
		cmap = bpf_map_lookup_elem(&outer_cgrp, &key);
		if (m == MODE_CREATE) {
			if (tmap)
				ls_fill(&create_st,
					bpf_task_storage_get(tmap, task, 0,
							     BPF_LOCAL_STORAGE_GET_F_CREATE));
			if (!cmap)
				continue;
			/*
			 * All workers share the cgroup: a racing creator wins
			 * (-EEXIST), or one in another map (-EAGAIN).
			 */
			v = bpf_cgrp_storage_get(cmap, cgrp, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
			if (!v)
				v = bpf_cgrp_storage_get(cmap, cgrp, 0,
							 BPF_LOCAL_STORAGE_GET_F_CREATE);
			ls_fill(&create_st, v);
			continue;
		}
		if (i >= PROG_SLOTS)
			continue;
		if (tmap) {
			rc = bpf_task_storage_delete(tmap, task);
			ls_count(delete_st.task_del, &delete_st.other_err, rc);
		}
		if (cmap) {
			rc = bpf_cgrp_storage_delete(cmap, cgrp);
			ls_count(delete_st.cgrp_del, &delete_st.other_err, rc);
		}
	}
	return 0;
}
