/* SPDX-License-Identifier: GPL-2.0 */
/*
 * User space helpers of the ls_defer_* tests: lsdefer_testmod's counters,
 * the deferred-free engine's counters, leak checks, worker threads.
 * Include after test_progs.h.
 */
#ifndef __LS_DEFER_HELPERS_H
#define __LS_DEFER_HELPERS_H

#include <limits.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include "lsdefer_testmod.h"
#include "ls_defer_common.h"
#include "ls_write_str.h"
#include "task_local_storage_helpers.h"

#ifndef PIDFD_THREAD
#define PIDFD_THREAD	O_EXCL
#endif

#define LS_MOD_DIR	"/sys/module/" LSDEFER_MOD_NAME
/*
 * ls_defer_irq's sys_churn_loops for the interrupt tests: deletes and
 * re-creates per syscall, task-context producers back to back, so that the
 * interrupts land among them.
 */
#define LS_SYS_CHURN_LOOPS	32
/* The engine's counters (rust/bpf/bpf_local_storage_defer.rs, StatsFile) */
#define LS_ENGINE_STATS	"/sys/kernel/debug/bpf_local_storage_defer/stats"

struct lsdefer_snap {
	long long v[LSDEFER_CNT_NR];
};

static inline int lsdefer_read(struct lsdefer_snap *s)
{
	char name[32];
	long long val;
	int i, n = 0;
	FILE *f;

	memset(s, 0, sizeof(*s));
	f = fopen(LSDEFER_STATS, "r");
	if (!f)
		return -errno;
	while (fscanf(f, "%31s %lld", name, &val) == 2) {
		for (i = 0; i < LSDEFER_CNT_NR; i++) {
			if (!strcmp(name, lsdefer_cnt_names[i])) {
				s->v[i] = val;
				n++;
			}
		}
	}
	fclose(f);
	return n == LSDEFER_CNT_NR ? 0 : -EINVAL;
}

static inline long long lsdefer_cnt(enum lsdefer_counter c)
{
	struct lsdefer_snap s;

	return lsdefer_read(&s) ? -1 : s.v[c];
}

/* The module's reference count: maps with its kptr type and programs with its kfuncs hold one */
static inline int lsdefer_refcnt(void)
{
	FILE *f = fopen(LS_MOD_DIR "/refcnt", "r");
	int n = -1;

	if (!f)
		return -1;
	if (fscanf(f, "%d", &n) != 1)
		n = -1;
	fclose(f);
	return n;
}

/*
 * True if lsdefer_testmod is loaded and its debugfs files are there; else
 * marks the (sub)test skipped and says why. Tries "lsdefer_testmod.ko" in the
 * current directory if the module is not loaded.
 */
static inline bool lsdefer_ready(void)
{
	if (access(LS_MOD_DIR, F_OK) && !access(LSDEFER_MOD_NAME ".ko", R_OK))
		load_module(LSDEFER_MOD_NAME ".ko", env_verbosity > VERBOSE_NONE);
	if (access(LS_MOD_DIR, F_OK)) {
		printf("%s:SKIP: %s not loaded (insmod %s.ko from the repo's Kbuild)\n",
		       __func__, LSDEFER_MOD_NAME, LSDEFER_MOD_NAME);
		test__skip();
		return false;
	}
	if (access(LSDEFER_STATS, R_OK))
		mount("debugfs", "/sys/kernel/debug", "debugfs", 0, NULL);
	if (access(LSDEFER_STATS, R_OK)) {
		printf("%s:SKIP: no %s (debugfs not mounted?)\n", __func__, LSDEFER_STATS);
		test__skip();
		return false;
	}
	if (lsdefer_refcnt() < 0) {
		printf("%s:SKIP: no %s/refcnt (CONFIG_MODULE_UNLOAD=n)\n", __func__, LS_MOD_DIR);
		test__skip();
		return false;
	}
	return true;
}

/* Sums of the "total" lines of the engine's stats file */
struct ls_engine {
	long long selem_queued, selem_freed;
	long long storage_queued, storage_freed;
};

static inline int ls_engine_read(struct ls_engine *e)
{
	long long q, b, g, fr, fl, mp;
	char line[256], name[32], cpu[32];
	int n = 0;
	FILE *f;

	memset(e, 0, sizeof(*e));
	f = fopen(LS_ENGINE_STATS, "r");
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%31s %31s %lld %lld %lld %lld %lld %lld",
			   name, cpu, &q, &b, &g, &fr, &fl, &mp) != 8 ||
		    strcmp(cpu, "total"))
			continue;
		if (!strcmp(name, "selem")) {
			e->selem_queued = q;
			e->selem_freed = fr;
			n++;
		} else if (!strcmp(name, "storage")) {
			e->storage_queued = q;
			e->storage_freed = fr;
			n++;
		}
	}
	fclose(f);
	return n == 2 ? 0 : -EINVAL;
}

/*
 * Leak check around a test: ls_leak_begin() before loading the skeleton,
 * ls_leak_end() after destroying it. Every object created in between must
 * have been destroyed exactly once by the time every map is freed, which is
 * when the module's reference count is back: a map holds it through its
 * btf_record until bpf_map_free() has run map_free(). Poll fast: what map
 * free forgot to wait for is freed a grace period later, if at all. Map free
 * waits for the engine's selems of the map (their free reads it) but not its
 * storages (their free never does): those the chain frees on its own.
 */
struct ls_leak_ck {
	int refcnt;
	struct lsdefer_snap s;
	bool engine;		/* the engine's stats file is there */
	long long selem_waiting;	/* queued - freed, before the test */
	long long storage_waiting;
};

/* Polls (fast) until the module's reference count is down to refcnt */
static inline int ls_poll_refcnt(int refcnt, int timeout_ms)
{
	__u64 deadline = get_time_ns() + (__u64)timeout_ms * 1000000;
	int n;

	while ((n = lsdefer_refcnt()) > refcnt) {
		if (get_time_ns() > deadline)
			break;
		usleep(500);
	}
	return n;
}

static inline bool ls_wait_refcnt(int refcnt, int timeout_ms)
{
	int n = ls_poll_refcnt(refcnt, timeout_ms);

	if (n != refcnt)
		printf("%s: module refcnt %d, want %d\n", __func__, n, refcnt);
	return n == refcnt;
}

static inline bool ls_leak_begin(struct ls_leak_ck *ck)
{
	struct ls_engine e;

	ck->engine = !ls_engine_read(&e);
	ck->selem_waiting = e.selem_queued - e.selem_freed;
	ck->storage_waiting = e.storage_queued - e.storage_freed;
	ck->refcnt = lsdefer_refcnt();
	return ASSERT_GE(ck->refcnt, 0, "lsdefer refcnt") &&
	       ASSERT_OK(lsdefer_read(&ck->s), "lsdefer stats");
}

/*
 * Checks against ck at the moment every map of the test is freed: the
 * selems (map free waits for them) and the kptr objects. Storages, which map
 * free does not wait for, are ls_check_storages_freed()'s.
 */
static inline bool ls_check_freed(const struct ls_leak_ck *ck, const char *what)
{
	struct lsdefer_snap s;
	struct ls_engine e;
	long long created, destroyed;
	bool ok = true;

	if (!ASSERT_OK(lsdefer_read(&s), "lsdefer stats"))
		return false;
	/* Whatever this test queued is freed: nothing more waits than before */
	if (ck->engine && ASSERT_OK(ls_engine_read(&e), "engine stats"))
		ok &= ASSERT_EQ(e.selem_queued - e.selem_freed, ck->selem_waiting,
				"engine: every selem queued by the test freed");
	created = s.v[LSDEFER_CNT_CREATED] - ck->s.v[LSDEFER_CNT_CREATED];
	destroyed = s.v[LSDEFER_CNT_DESTROYED] - ck->s.v[LSDEFER_CNT_DESTROYED];
	ok &= ASSERT_EQ(destroyed, created, what);
	ok &= ASSERT_EQ(s.v[LSDEFER_CNT_BAD] - ck->s.v[LSDEFER_CNT_BAD], 0,
			"no object destroyed twice");
	if (!ok)
		printf("%s: %s: created %lld destroyed %lld (dtor %lld) bad %lld\n",
		       __func__, what, created, destroyed,
		       s.v[LSDEFER_CNT_DTOR] - ck->s.v[LSDEFER_CNT_DTOR],
		       s.v[LSDEFER_CNT_BAD] - ck->s.v[LSDEFER_CNT_BAD]);
	return ok;
}

/* Longest wait for the engine's chain to free the test's storages */
#define LS_STORAGE_WAIT_MS	10000

/*
 * The storages the test queued are freed by the chain alone, without a
 * flush, within LS_STORAGE_WAIT_MS: no reader holds a grace period any more.
 * At most as many wait as before the test (some of those may have gone).
 */
static inline bool ls_check_storages_freed(const struct ls_leak_ck *ck)
{
	__u64 deadline = get_time_ns() + LS_STORAGE_WAIT_MS * 1000000ULL;
	struct ls_engine e;

	if (!ck->engine)
		return true;
	if (!ASSERT_OK(ls_engine_read(&e), "engine stats"))
		return false;
	while (e.storage_queued - e.storage_freed > ck->storage_waiting &&
	       get_time_ns() < deadline) {
		usleep(1000);
		if (!ASSERT_OK(ls_engine_read(&e), "engine stats"))
			return false;
	}
	return ASSERT_LE(e.storage_queued - e.storage_freed, ck->storage_waiting,
			 "engine: storages freed by the chain within 10 s, no flush");
}

/*
 * Set when a test's maps were not freed within the bound: map free is stuck
 * (it waits for elements it will never see freed), and every later test
 * would wait the whole bound for its own maps, until the guest times out.
 * Later tests fail after a short wait instead. Weak: one flag for all the
 * test files that include this header.
 */
bool ls_map_free_stuck __weak;

static inline bool ls_leak_end(const struct ls_leak_ck *ck)
{
	int wait_ms = ls_map_free_stuck ? 2000 : 60000;

	if (!ASSERT_TRUE(ls_wait_refcnt(ck->refcnt, wait_ms), "maps and programs freed")) {
		ls_map_free_stuck = true;
		return false;
	}
	return ls_check_freed(ck, "every kptr object destroyed once its map is freed") &&
	       ls_check_storages_freed(ck);
}

/* What one program (or context) counted */
static inline void ls_print_stats(const char *name, const struct ls_defer_stats *st)
{
	printf("%s: runs %llu foreign %llu nmi %llu hardirq %llu arg_nmi %llu in_task_del %llu\n",
	       name, st->runs, st->foreign, st->in_nmi, st->in_hardirq, st->arg_nmi,
	       st->in_task_del);
	printf("%s: created %llu create_fail %llu obj_fail %llu\n",
	       name, st->created, st->create_fail, st->obj_fail);
	printf("%s: task del ok %llu enoent %llu eopnotsupp %llu busy %llu other %llu (%lld)\n",
	       name, st->task_del[LS_RC_OK], st->task_del[LS_RC_ENOENT],
	       st->task_del[LS_RC_EOPNOTSUPP], st->task_del[LS_RC_BUSY],
	       st->task_del[LS_RC_OTHER], st->other_err);
	printf("%s: cgrp del ok %llu enoent %llu eopnotsupp %llu busy %llu other %llu\n",
	       name, st->cgrp_del[LS_RC_OK], st->cgrp_del[LS_RC_ENOENT],
	       st->cgrp_del[LS_RC_EOPNOTSUPP], st->cgrp_del[LS_RC_BUSY],
	       st->cgrp_del[LS_RC_OTHER]);
}

/* No delete of st's program (ctx: its context) refused, none failed unexpectedly */
static inline void ls_check_no_refusal(const struct ls_defer_stats *st, const char *ctx)
{
	char msg[96];

	snprintf(msg, sizeof(msg), "%s: task storage delete refused (-EOPNOTSUPP)", ctx);
	ASSERT_EQ(st->task_del[LS_RC_EOPNOTSUPP], 0, msg);
	snprintf(msg, sizeof(msg), "%s: cgroup storage delete refused (-EOPNOTSUPP)", ctx);
	ASSERT_EQ(st->cgrp_del[LS_RC_EOPNOTSUPP], 0, msg);
	snprintf(msg, sizeof(msg), "%s: task storage delete: unexpected error (last %lld)",
		 ctx, (long long)st->other_err);
	ASSERT_EQ(st->task_del[LS_RC_OTHER], 0, msg);
	snprintf(msg, sizeof(msg), "%s: cgroup storage delete: unexpected error (last %lld)",
		 ctx, (long long)st->other_err);
	ASSERT_EQ(st->cgrp_del[LS_RC_OTHER], 0, msg);
}

static inline int ls_nr_cpus(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	return n > 0 ? n : 1;
}

static inline int ls_pin_cpu(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static inline int ls_unpin(void)
{
	cpu_set_t set;
	int i;

	CPU_ZERO(&set);
	for (i = 0; i < CPU_SETSIZE; i++)
		CPU_SET(i, &set);
	return pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

/* A pidfd for the calling thread: the key of its task storage */
static inline int ls_self_pidfd(void)
{
	int fd = sys_pidfd_open(sys_gettid(), PIDFD_THREAD);

	if (fd < 0 && errno == EINVAL && sys_gettid() == getpid())
		fd = sys_pidfd_open(getpid(), 0);
	return fd;
}

/* Flags shared with worker threads */
static inline int ls_load(const int *p)
{
	return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void ls_store(int *p, int v)
{
	__atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/* Worker threads that loop on fn until told to stop */
struct ls_worker;
typedef void (*ls_worker_fn)(struct ls_worker *w);

struct ls_worker {
	pthread_t thread;
	ls_worker_fn fn;
	void *ctx;		/* the test's */
	int *stop;
	int cpu;		/* -1: not pinned */
	int pidfd;		/* the worker thread's */
	unsigned int seed;
	unsigned long iters;
	int err;		/* first error fn saw */
	bool started;
};

static inline void *ls_worker_main(void *arg)
{
	struct ls_worker *w = arg;

	if (w->cpu >= 0 && ls_pin_cpu(w->cpu))
		w->err = -EINVAL;
	w->pidfd = ls_self_pidfd();
	if (w->pidfd < 0 && !w->err)
		w->err = -errno;
	while (!ls_load(w->stop)) {
		w->fn(w);
		w->iters++;
	}
	if (w->pidfd >= 0)
		close(w->pidfd);
	return NULL;
}

static inline int ls_workers_start(struct ls_worker *w, int n, ls_worker_fn fn,
				   void *ctx, int *stop, int cpu)
{
	int i, err;

	for (i = 0; i < n; i++) {
		memset(&w[i], 0, sizeof(w[i]));
		w[i].fn = fn;
		w[i].ctx = ctx;
		w[i].stop = stop;
		w[i].cpu = cpu < 0 ? -1 : (cpu == INT_MAX ? i % ls_nr_cpus() : cpu);
		w[i].pidfd = -1;
		w[i].seed = i * 7919 + 17;
		err = pthread_create(&w[i].thread, NULL, ls_worker_main, &w[i]);
		if (err)
			return -err;
		w[i].started = true;
	}
	return 0;
}

/* Stops and joins; returns the first error a worker saw */
static inline int ls_workers_stop(struct ls_worker *w, int n, int *stop)
{
	int i, err = 0;

	ls_store(stop, 1);
	for (i = 0; i < n; i++) {
		if (!w[i].started)
			continue;
		pthread_join(w[i].thread, NULL);
		w[i].started = false;
		if (!err)
			err = w[i].err;
	}
	return err;
}

#endif /* __LS_DEFER_HELPERS_H */
