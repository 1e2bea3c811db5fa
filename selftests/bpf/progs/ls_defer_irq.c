// SPDX-License-Identifier: GPL-2.0
/*
 * Delete (and re-create) task and cgroup local storage from NMI and hard
 * interrupt programs, while task-context programs and syscalls of the same
 * process delete and re-create the same storage on every CPU. Every value
 * holds a referenced kptr whose destructor lsdefer_testmod counts, so user
 * space can check that each value was freed exactly once.
 *
 * Used by prog_tests/ls_defer_nmi.c, ls_defer_hardirq.c and ls_defer_hotplug.c.
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

/*
 * irq_victim: task context re-creates its value here on every churn loop, and
 * only the interrupt programs delete it, so that an interrupt that lands in
 * the middle of a task-context delete finds something to delete, and frees it
 * onto the same CPU's list, nearly every time.
 */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ls_defer_val);
} victim_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_CGRP_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ls_defer_val);
} cgrp_map SEC(".maps");

/* Only threads of this process are touched. */
int target_tgid;
/* The interrupt programs also delete the cgroup storage of current. */
bool irq_cgrp;
/*
 * The interrupt programs re-create what they deleted (get(F_CREATE), counted
 * by ls_fill(): created or create_fail). From NMI a create that fails, e.g.
 * with -EDEADLK on a holder of the storage's lock, frees its new element there.
 */
bool irq_recreate;
/* The interrupt programs delete victim_map's value first. */
bool irq_victim;
/* tp_btf: each syscall of the target deletes and re-creates its storage. */
bool sys_churn;
/* Only this syscall number triggers sys_churn (-1: any). */
long sys_churn_nr = -1;
/*
 * Deletes and re-creates per syscall: more producers per second in task
 * context, so more interrupts land in the middle of one.
 */
int sys_churn_loops = 1;
/* The cgroup SEC("syscall") fill creates storage for. */
u64 fill_cgid;

/*
 * Per CPU: set while sys_churn_one() is inside its task storage delete, so
 * that the interrupt programs count the runs that landed in the middle of one
 * (in_task_del). Tracing programs run with migration disabled.
 */
__u32 task_deleting[LS_DEFER_MAX_CPUS];

struct ls_defer_stats nmi_st;	/* fentry on the NMI handler's hook */
struct ls_defer_stats perf_st;	/* perf_event: NMI (hw) or hardirq (cpu-clock) */
struct ls_defer_stats sys_st;	/* tp_btf/sys_enter, task context */
struct ls_defer_stats fill_st;	/* SEC("syscall") fill */

static __always_inline bool is_target(struct task_struct *task)
{
	return target_tgid && task->tgid == target_tgid;
}

/* Runs in NMI or hard interrupt context: delete, then maybe re-create. */
static __always_inline void irq_delete(struct ls_defer_stats *st, int arg_nmi)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct cgroup *cgrp;
	u32 ctx;
	long rc;

	if (!is_target(task)) {
		__sync_fetch_and_add(&st->foreign, 1);
		return;
	}
	ctx = bpf_lsdefer_ctx();
	__sync_fetch_and_add(&st->runs, 1);
	if (ctx & LSDEFER_CTX_NMI)
		__sync_fetch_and_add(&st->in_nmi, 1);
	else if (ctx & LSDEFER_CTX_HARDIRQ)
		__sync_fetch_and_add(&st->in_hardirq, 1);
	if (arg_nmi)
		__sync_fetch_and_add(&st->arg_nmi, 1);
	if (task_deleting[bpf_get_smp_processor_id() & (LS_DEFER_MAX_CPUS - 1)])
		__sync_fetch_and_add(&st->in_task_del, 1);

	if (irq_victim) {
		rc = bpf_task_storage_delete(&victim_map, task);
		ls_count(st->task_del, &st->other_err, rc);
	}
	rc = bpf_task_storage_delete(&task_map, task);
	ls_count(st->task_del, &st->other_err, rc);
	if (irq_recreate)
		ls_fill(st, bpf_task_storage_get(&task_map, task, 0,
						 BPF_LOCAL_STORAGE_GET_F_CREATE));
	if (!irq_cgrp)
		return;

	cgrp = task->cgroups->dfl_cgrp;
	rc = bpf_cgrp_storage_delete(&cgrp_map, cgrp);
	ls_count(st->cgrp_del, &st->other_err, rc);
	if (irq_recreate)
		ls_fill(st, bpf_cgrp_storage_get(&cgrp_map, cgrp, 0,
						 BPF_LOCAL_STORAGE_GET_F_CREATE));
}

/* lsdefer_testmod's NMI handler calls bpf_lsdefer_nmi_target(in_nmi()). */
SEC("fentry/bpf_lsdefer_nmi_target")
int BPF_PROG(nmi_delete, int in_nmi)
{
	irq_delete(&nmi_st, in_nmi);
	return 0;
}

SEC("perf_event")
int perf_delete(void *ctx)
{
	irq_delete(&perf_st, 0);
	return 0;
}

/*
 * Task context, preemptible, interruptible: delete and re-create the task
 * and cgroup storage on each syscall of the target. Unlike the bpf() syscall
 * (bpf_disable_instrumentation() sets bpf_prog_active), a tracing program
 * leaves perf_event programs free to run from an interrupt that lands in the
 * middle of its delete.
 */
static int sys_churn_one(__u32 i, void *data)
{
	struct task_struct *task = bpf_get_current_task_btf();
	u32 cpu = bpf_get_smp_processor_id() & (LS_DEFER_MAX_CPUS - 1);
	struct cgroup *cgrp;
	long rc;

	if (irq_victim && !bpf_task_storage_get(&victim_map, task, 0, 0))
		ls_fill(&sys_st, bpf_task_storage_get(&victim_map, task, 0,
						      BPF_LOCAL_STORAGE_GET_F_CREATE));

	__sync_fetch_and_add(&task_deleting[cpu], 1);
	rc = bpf_task_storage_delete(&task_map, task);
	__sync_fetch_and_add(&task_deleting[cpu], -1);
	ls_count(sys_st.task_del, &sys_st.other_err, rc);
	ls_fill(&sys_st, bpf_task_storage_get(&task_map, task, 0,
					      BPF_LOCAL_STORAGE_GET_F_CREATE));

	cgrp = task->cgroups->dfl_cgrp;
	rc = bpf_cgrp_storage_delete(&cgrp_map, cgrp);
	ls_count(sys_st.cgrp_del, &sys_st.other_err, rc);
	ls_fill(&sys_st, bpf_cgrp_storage_get(&cgrp_map, cgrp, 0,
					      BPF_LOCAL_STORAGE_GET_F_CREATE));
	return 0;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(sys_enter_churn, struct pt_regs *regs, long id)
{
	int n = sys_churn_loops;

	if (!sys_churn || (sys_churn_nr >= 0 && id != sys_churn_nr))
		return 0;
	if (!is_target(bpf_get_current_task_btf()))
		return 0;
	__sync_fetch_and_add(&sys_st.runs, 1);
	bpf_loop(n > 0 && n <= 64 ? n : 1, sys_churn_one, NULL, 0);
	return 0;
}

/* Create the caller's task storage and fill_cgid's cgroup storage. */
SEC("syscall")
int fill(void *ctx)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct cgroup *cgrp;

	__sync_fetch_and_add(&fill_st.runs, 1);
	ls_fill(&fill_st, bpf_task_storage_get(&task_map, task, 0,
					       BPF_LOCAL_STORAGE_GET_F_CREATE));
	cgrp = bpf_cgroup_from_id(fill_cgid);
	if (!cgrp) {
		__sync_fetch_and_add(&fill_st.create_fail, 1);
		return 0;
	}
	ls_fill(&fill_st, bpf_cgrp_storage_get(&cgrp_map, cgrp, 0,
					       BPF_LOCAL_STORAGE_GET_F_CREATE));
	bpf_cgroup_release(cgrp);
	return 0;
}
