/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shared by progs/local_storage_defer_bench.c and
 * benchs/bench_local_storage_defer.c: what the programs count and the
 * operations user space asks for. Fixed-size types only.
 */
#ifndef __LOCAL_STORAGE_DEFER_BENCH_H
#define __LOCAL_STORAGE_DEFER_BENCH_H

/* First word of every value the bench creates, so that the free probe knows its own */
#define LSDB_MAGIC		0x4c53444246726565ULL
/* Values are 64 bytes, with and without a kptr */
#define LSDB_VAL_PAD		6

/* The plain value; the kptr one has the same size and head */
struct lsdb_val {
	__u64 magic;		/* LSDB_MAGIC */
	__u64 t_del;		/* bpf_ktime_get_ns() before the delete, else 0 */
	__u64 pad[LSDB_VAL_PAD];
};

/*
 * getpgid(LSDB_PID(op)): the fentry program on getpgid does op for the
 * calling thread. A negative pid: the syscall itself fails fast (-ESRCH).
 */
enum lsdb_op {
	LSDB_OP_CHURN = 1,	/* loops x (get(F_CREATE), stamp, delete) */
	LSDB_OP_CREATE,		/* get(F_CREATE) once */
	LSDB_OP_DELETE,		/* stamp, delete once */
	LSDB_OP_NR,
};

#define LSDB_PID_BASE		0x4c5300
#define LSDB_PID(op)		(-(LSDB_PID_BASE + (op)))

/*
 * A churn map's name, the key of its close timestamp: unique per map, and
 * still there when bpf_local_storage_map_free() runs, where map->id is
 * already 0 (bpf_map_free_id() at the last put).
 */
struct lsdb_map_name {
	char name[16];		/* BPF_OBJ_NAME_LEN */
};

/* Counters, one set per CPU (a per-CPU array of one element) */
struct lsdb_cnt {
	__u64 del_ok;		/* deletes that returned 0 */
	__u64 del_enoent;	/* nothing to delete */
	__u64 del_refused;	/* -EOPNOTSUPP: 7.3 refuses deletes in NMI */
	__u64 del_busy;		/* -EDEADLK, -ETIMEDOUT, -EBUSY (rqspinlock) */
	__u64 del_other;
	__u64 create_ok;
	__u64 create_fail;	/* get(F_CREATE) returned NULL */
	__u64 obj_fail;		/* bpf_lsdefer_obj_new() returned NULL */
	__u64 freed;		/* stamped values seen in bpf_obj_free_fields() */
	__u64 srcu_calls;	/* call_srcu() on the Tasks Trace srcu_struct */
	__u64 maps_freed;	/* bpf_local_storage_map_free() returns */
	__u64 nmi_runs;		/* runs of the NMI program for the bench */
	__s64 last_err;		/* last error counted as del_other */
};

/*
 * Log-linear latency histogram (ns): below 8 ns one bucket per ns, then 8
 * buckets per power of two (at most 12.5% wide), up to 2^41 ns.
 */
#define LSDB_HIST_SUB		8
#define LSDB_HIST_N		320

#if defined(__bpf__)
/*
 * Weak, so that the bench loads without lsdefer_testmod (and then loads
 * neither the kptr nor the NMI program): libbpf resolves them at load time,
 * to 0 when they are missing; no kernel link is involved, which is what
 * checkpatch's WEAK_DECLARATION is about. Include this header before
 * lsdefer_testmod.h: clang keeps a symbol weak only if its first
 * declaration is.
 */
struct lsdefer_obj;
struct lsdefer_obj *bpf_lsdefer_obj_new(void)
	__weak __ksym;
void bpf_lsdefer_obj_release(struct lsdefer_obj *obj)
	__weak __ksym;
/* Typeless: its address, from kallsyms (CONFIG_KALLSYMS_ALL) */
extern const void rcu_tasks_trace_srcu_struct
	__weak __ksym;
#endif

#endif /* __LOCAL_STORAGE_DEFER_BENCH_H */
