// SPDX-License-Identifier: GPL-2.0
/*
 * Programs of the local storage free-path benchmarks
 * (benchs/bench_local_storage_defer.c), the same on the stock kernel and on
 * ours:
 *
 * - lsdb_getpgid*: getpgid(LSDB_PID(op)) from a bench thread creates,
 *   deletes, or loops create+delete of its own task storage (task context).
 * - lsdb_nmi: the same loop from lsdefer_testmod's NMI hook.
 * - lsdb_free: every value the bench deleted carries its delete time; the
 *   probe on bpf_obj_free_fields(), which both kernels call on the value
 *   right before its kfree() once its grace period is over, turns it into a
 *   delete-to-free latency. No engine change is needed.
 * - lsdb_call_srcu: call_srcu() on the Tasks Trace srcu_struct, i.e.
 *   call_rcu_tasks_trace(), counted on both kernels.
 * - lsdb_read_gp_seq: that srcu_struct's grace-period sequence, to count
 *   the Tasks Trace grace periods that ran.
 * - lsdb_map_freed: the end of bpf_local_storage_map_free(), for the
 *   close-to-free latency of the maps user space closes.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "bpf_misc.h"
/* First: its weak kfunc declarations must come before lsdefer_testmod.h's. */
#include "local_storage_defer_bench.h"
#include "lsdefer_testmod.h"
#include "ls_errno.h"

char _license[] SEC("license") = "GPL";

/* struct lsdb_val's size and head, with a kptr; spelled out for checkpatch */
struct lsdb_kval {
	__u64 magic;
	__u64 t_del;
	struct lsdefer_obj __attribute__((btf_type_tag("kptr"))) *obj;
	__u64 pad[LSDB_VAL_PAD - 1];
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct lsdb_val);
} task_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct lsdb_kval);
} kptr_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lsdb_cnt);
} cnt SEC(".maps");

/* Map name -> CLOCK_MONOTONIC ns of its close() (map churn) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct lsdb_map_name);
	__type(value, __u64);
} close_ts SEC(".maps");

/* The bench process; its children (sleepers) count as its own */
int bench_tgid;
/* Create+delete rounds per getpgid(LSDB_PID(LSDB_OP_CHURN)) */
int churn_loops = 16;
/* lsdb_getpgid churns the plain value (false: lsdb_getpgid_kptr does) */
bool plain_churn = true;
/* ... per NMI */
int nmi_loops = 4;

__u64 lat_hist[LSDB_HIST_N];	/* delete to free, ns */
__u64 map_hist[LSDB_HIST_N];	/* close to the end of map free, ns */
__u64 gp_seq;			/* srcu_gp_seq, as lsdb_read_gp_seq last read it */

static __always_inline struct lsdb_cnt *cnt_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&cnt, &zero);
}

static __always_inline bool is_bench(struct task_struct *task)
{
	return bench_tgid && (task->tgid == bench_tgid ||
			      task->real_parent->tgid == bench_tgid);
}

static __always_inline void count_del(struct lsdb_cnt *c, long rc)
{
	switch (rc) {
	case 0:
		__sync_fetch_and_add(&c->del_ok, 1);
		break;
	case -ENOENT:
		__sync_fetch_and_add(&c->del_enoent, 1);
		break;
	case -EOPNOTSUPP:
		__sync_fetch_and_add(&c->del_refused, 1);
		break;
	case -EDEADLK:
	case -ETIMEDOUT:
	case -EBUSY:
		__sync_fetch_and_add(&c->del_busy, 1);
		break;
	default:
		__sync_fetch_and_add(&c->del_other, 1);
		c->last_err = rc;
		break;
	}
}

static __always_inline __u32 lsdb_msb(__u64 v)
{
	__u32 r = 0;

	if (v >> 32) {
		v >>= 32;
		r += 32;
	}
	if (v >> 16) {
		v >>= 16;
		r += 16;
	}
	if (v >> 8) {
		v >>= 8;
		r += 8;
	}
	if (v >> 4) {
		v >>= 4;
		r += 4;
	}
	if (v >> 2) {
		v >>= 2;
		r += 2;
	}
	if (v >> 1)
		r += 1;
	return r;
}

/* See LSDB_HIST_SUB; bench_local_storage_defer.c's hist_low() inverts it. */
static __always_inline void hist_add(__u64 *hist, __u64 ns)
{
	__u32 msb, idx;

	if (ns < LSDB_HIST_SUB) {
		idx = ns;
	} else {
		msb = lsdb_msb(ns);
		idx = (msb - 2) * LSDB_HIST_SUB + ((ns >> (msb - 3)) & (LSDB_HIST_SUB - 1));
	}
	if (idx >= LSDB_HIST_N)
		idx = LSDB_HIST_N - 1;
	__sync_fetch_and_add(&hist[idx], 1);
}

/* A new value is zeroed: mark it as the bench's. */
static __always_inline bool mark_new(struct lsdb_cnt *c, __u64 *magic, __u64 *t_del)
{
	if (*magic == LSDB_MAGIC)
		return false;
	*magic = LSDB_MAGIC;
	*t_del = 0;
	__sync_fetch_and_add(&c->create_ok, 1);
	return true;
}

/* Put a fresh object into v->obj, destroying the one it replaces. */
static __always_inline void put_obj(struct lsdb_cnt *c, struct lsdb_kval *v)
{
	struct lsdefer_obj *obj, *old;

	obj = bpf_lsdefer_obj_new();
	if (!obj) {
		__sync_fetch_and_add(&c->obj_fail, 1);
		return;
	}
	old = bpf_kptr_xchg(&v->obj, obj);
	if (old)
		bpf_lsdefer_obj_release(old);
}

static __always_inline int plain_create(struct lsdb_cnt *c, struct task_struct *task)
{
	struct lsdb_val *v;

	v = bpf_task_storage_get(&task_map, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!v) {
		__sync_fetch_and_add(&c->create_fail, 1);
		return -1;
	}
	mark_new(c, &v->magic, &v->t_del);
	return 0;
}

static __always_inline void plain_delete(struct lsdb_cnt *c, struct task_struct *task)
{
	struct lsdb_val *v;
	long rc;

	v = bpf_task_storage_get(&task_map, task, 0, 0);
	if (!v) {
		__sync_fetch_and_add(&c->del_enoent, 1);
		return;
	}
	v->t_del = bpf_ktime_get_ns();
	rc = bpf_task_storage_delete(&task_map, task);
	/* Still linked: a later free (owner exit, map free) is no delete's. */
	if (rc)
		v->t_del = 0;
	count_del(c, rc);
}

static int churn_plain(__u32 i, void *data)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct lsdb_cnt *c = cnt_get();

	if (!c)
		return 1;
	if (plain_create(c, task))
		return 0;
	plain_delete(c, task);
	return 0;
}

static int churn_kptr(__u32 i, void *data)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct lsdb_cnt *c = cnt_get();
	struct lsdb_kval *v;
	long rc;

	if (!c || !bpf_ksym_exists(bpf_lsdefer_obj_new))
		return 1;
	v = bpf_task_storage_get(&kptr_map, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!v) {
		__sync_fetch_and_add(&c->create_fail, 1);
		return 0;
	}
	if (mark_new(c, &v->magic, &v->t_del))
		put_obj(c, v);
	v->t_del = bpf_ktime_get_ns();
	rc = bpf_task_storage_delete(&kptr_map, task);
	if (rc)
		v->t_del = 0;
	count_del(c, rc);
	return 0;
}

static __always_inline long getpgid_op(struct pt_regs *regs)
{
	int pid = (int)PT_REGS_PARM1_CORE_SYSCALL(regs);

	return -(long)pid - LSDB_PID_BASE;
}

/* Task context: the op user space asked for, on the plain value */
SEC("fentry/" SYS_PREFIX "sys_getpgid")
int BPF_PROG(lsdb_getpgid, struct pt_regs *regs)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct lsdb_cnt *c;
	long op;

	if (!is_bench(task))
		return 0;
	op = getpgid_op(regs);
	c = cnt_get();
	if (!c)
		return 0;
	switch (op) {
	case LSDB_OP_CHURN:
		if (plain_churn)
			bpf_loop(churn_loops, churn_plain, NULL, 0);
		break;
	case LSDB_OP_CREATE:
		plain_create(c, task);
		break;
	case LSDB_OP_DELETE:
		plain_delete(c, task);
		break;
	}
	return 0;
}

/* The same churn on the value that holds a kptr (lsdefer_testmod's object) */
SEC("fentry/" SYS_PREFIX "sys_getpgid")
int BPF_PROG(lsdb_getpgid_kptr, struct pt_regs *regs)
{
	if (!is_bench(bpf_get_current_task_btf()))
		return 0;
	if (getpgid_op(regs) == LSDB_OP_CHURN)
		bpf_loop(churn_loops, churn_kptr, NULL, 0);
	return 0;
}

/* lsdefer_testmod's NMI handler calls bpf_lsdefer_nmi_target(in_nmi()). */
SEC("fentry/bpf_lsdefer_nmi_target")
int BPF_PROG(lsdb_nmi, int in_nmi)
{
	struct lsdb_cnt *c;

	if (!is_bench(bpf_get_current_task_btf()))
		return 0;
	c = cnt_get();
	if (!c)
		return 0;
	__sync_fetch_and_add(&c->nmi_runs, 1);
	bpf_loop(nmi_loops, churn_plain, NULL, 0);
	return 0;
}

/*
 * Both kernels call bpf_obj_free_fields(record, value) on an element's value
 * right before they kfree() it, after its grace period: 7.3 in
 * bpf_selem_free_trace_rcu(), ours in the engine's Selem::free(), for any
 * value, with or without fields. The value still holds what the deleter
 * wrote.
 */
SEC("fentry/bpf_obj_free_fields")
int BPF_PROG(lsdb_free, const struct btf_record *rec, void *obj)
{
	struct lsdb_cnt *c;
	__u64 hdr[2], now;

	if (!obj || bpf_probe_read_kernel(hdr, sizeof(hdr), obj))
		return 0;
	if (hdr[0] != LSDB_MAGIC || !hdr[1])
		return 0;
	now = bpf_ktime_get_ns();
	hist_add(lat_hist, now > hdr[1] ? now - hdr[1] : 0);
	c = cnt_get();
	if (c)
		__sync_fetch_and_add(&c->freed, 1);
	return 0;
}

/* call_rcu_tasks_trace() is call_srcu(&rcu_tasks_trace_srcu_struct, ...) in 7.3. */
SEC("fentry/call_srcu")
int BPF_PROG(lsdb_call_srcu, struct srcu_struct *ssp)
{
	struct lsdb_cnt *c;

	if ((__u64)ssp != (__u64)&rcu_tasks_trace_srcu_struct)
		return 0;
	c = cnt_get();
	if (c)
		__sync_fetch_and_add(&c->srcu_calls, 1);
	return 0;
}

/*
 * The Tasks Trace grace-period sequence: the counter part (above the two
 * state bits) advances by one per grace period.
 */
SEC("syscall")
int lsdb_read_gp_seq(void *ctx)
{
	struct srcu_struct *ssp = (void *)&rcu_tasks_trace_srcu_struct;

	if (!bpf_ksym_exists(&rcu_tasks_trace_srcu_struct)) {
		gp_seq = 0;
		return 1;
	}
	gp_seq = BPF_CORE_READ(ssp, srcu_sup, srcu_gp_seq);
	return 0;
}

/* A map user space closed is gone: bpf_local_storage_map_free() returned. */
SEC("fexit/bpf_local_storage_map_free")
int BPF_PROG(lsdb_map_freed, struct bpf_map *map)
{
	struct lsdb_map_name key = {};
	struct lsdb_cnt *c;
	__u64 *t, now;

	bpf_probe_read_kernel(key.name, sizeof(key.name), map->name);
	t = bpf_map_lookup_elem(&close_ts, &key);
	if (!t)
		return 0;
	now = bpf_ktime_get_ns();
	hist_add(map_hist, now > *t ? now - *t : 0);
	bpf_map_delete_elem(&close_ts, &key);
	c = cnt_get();
	if (c)
		__sync_fetch_and_add(&c->maps_freed, 1);
	return 0;
}
