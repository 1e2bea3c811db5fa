/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Interface of lsdefer_testmod.ko (repo: selftests/kmod/lsdefer_testmod.c),
 * shared by the module, the ls_defer_* BPF programs and test_progs. Plain
 * fixed-size types only: the three see different headers.
 */
#ifndef __LSDEFER_TESTMOD_H
#define __LSDEFER_TESTMOD_H

#define LSDEFER_MOD_NAME	"lsdefer_testmod"
#define LSDEFER_DEBUGFS		"/sys/kernel/debug/lsdefer_testmod"
#define LSDEFER_STATS		LSDEFER_DEBUGFS "/stats"
/* write "N": raise N NMIs, one at a time, on the writer's CPU (x86 only) */
#define LSDEFER_NMI		LSDEFER_DEBUGFS "/nmi"
/* write "CPU N GAP_US": raise N NMIs on CPU, GAP_US apart at most (x86) */
#define LSDEFER_NMI_STORM	LSDEFER_DEBUGFS "/nmi_storm"
/*
 * write "N": N times, on the writer's CPU, hold the lock of the writer's task
 * local storage and raise an NMI (x86 only): the NMI program's creates and
 * deletes of that storage fail with -EDEADLK and take their error paths.
 */
#define LSDEFER_NMI_LOCKED	LSDEFER_DEBUGFS "/nmi_locked"

/*
 * An object BPF programs get from bpf_lsdefer_obj_new() and keep as a
 * referenced kptr in local storage values. bpf_obj_free_fields() destroys it
 * through its destructor; bpf_lsdefer_obj_release() destroys it directly.
 * Destroying checks and poisons magic, so a double destroy is counted even
 * when KASAN is off.
 */
struct lsdefer_obj {
	__u64 magic;
	__u64 id;
};

#define LSDEFER_OBJ_LIVE	0x4c6976654c736446ULL
#define LSDEFER_OBJ_DEAD	0x446561644c736446ULL

/*
 * Counters, in the order of the stats file ("name value" per line), also
 * readable from programs with bpf_lsdefer_counter().
 */
enum lsdefer_counter {
	LSDEFER_CNT_CREATED,	/* objects handed out by bpf_lsdefer_obj_new() */
	LSDEFER_CNT_DESTROYED,	/* objects destroyed, either way */
	LSDEFER_CNT_DTOR,	/* ... of which by the kptr destructor */
	LSDEFER_CNT_BAD,	/* destroy of an object without the live magic */
	LSDEFER_CNT_SEQ,	/* event clock: bpf_lsdefer_seq(), each dtor */
	LSDEFER_CNT_LAST_DTOR_SEQ, /* clock value of the latest dtor */
	LSDEFER_CNT_NMI,	/* NMIs that called bpf_lsdefer_nmi_target() */
	LSDEFER_CNT_NMI_LOST,	/* NMIs raised that did not arrive in time */
	LSDEFER_CNT_NMI_LOCKED,	/* NMIs raised holding a task storage lock */
	LSDEFER_CNT_NR,
};

#if !defined(__bpf__)
/* Their names in the stats file, for the module and for test_progs */
static const char * const lsdefer_cnt_names[LSDEFER_CNT_NR] = {
	[LSDEFER_CNT_CREATED]		= "created",
	[LSDEFER_CNT_DESTROYED]		= "destroyed",
	[LSDEFER_CNT_DTOR]		= "dtor",
	[LSDEFER_CNT_BAD]		= "bad",
	[LSDEFER_CNT_SEQ]		= "seq",
	[LSDEFER_CNT_LAST_DTOR_SEQ]	= "last_dtor_seq",
	[LSDEFER_CNT_NMI]		= "nmi",
	[LSDEFER_CNT_NMI_LOST]		= "nmi_lost",
	[LSDEFER_CNT_NMI_LOCKED]	= "nmi_locked",
};
#endif

/* bpf_lsdefer_ctx(): the context a program runs in */
#define LSDEFER_CTX_NMI		1U
#define LSDEFER_CTX_HARDIRQ	2U
#define LSDEFER_CTX_SOFTIRQ	4U

#if defined(__bpf__)
/* leading __ksym: checkpatch takes "(void) __ksym" for a cast */
__ksym struct lsdefer_obj *bpf_lsdefer_obj_new(void);
__ksym void bpf_lsdefer_obj_release(struct lsdefer_obj *obj);
__ksym __u64 bpf_lsdefer_counter(__u32 idx);
__ksym __u64 bpf_lsdefer_seq(void);
__ksym __u32 bpf_lsdefer_ctx(void);
#endif

#endif /* __LSDEFER_TESTMOD_H */
