// SPDX-License-Identifier: GPL-2.0
/*
 * Delete task and cgroup local storage from NMI programs.
 *
 * 7.3's bpf_selem_unlink() returns -EOPNOTSUPP in NMI: freeing the element
 * took call_rcu_tasks_trace(), which is call_srcu(), not allowed there. With
 * the deferred-free engine an NMI delete queues the element on a lock-less
 * per-CPU list and returns 0.
 *
 * self_nmi:    lsdefer_testmod raises an NMI on the test's CPU; a fentry
 *              program on the handler's hook deletes the task and cgroup
 *              storage the test created. Each of the runs is in NMI, both
 *              deletes return 0 and the elements are gone. Fails on stock 7.3.
 * nmi_storm:   one CPU raises NMIs on another that runs threads deleting and
 *              re-creating the same storage from syscalls and tp_btf
 *              programs; the NMI program deletes and re-creates it too. An
 *              NMI that lands in the middle of a task-context delete queues
 *              onto the same CPU's list: a producer list that is not NMI-safe
 *              loses elements or frees them twice, which the destructor
 *              counts show (and KASAN, in sanitized runs). An NMI create that
 *              fails frees its element in NMI (see create_error): without the
 *              engine, a lockdep splat, when an NMI happens to land on a lock
 *              holder.
 * create_error: lsdefer_testmod holds the lock of the test thread's task
 *              storage (not empty: it holds a victim_map value) and raises
 *              an NMI on its CPU, 64 times. The NMI program finds no task_map
 *              value to delete, and its get(F_CREATE) on task_map gets
 *              -EDEADLK from rqspinlock, so bpf_local_storage_update() frees
 *              the element it never published, in NMI. Checks: 64 runs, all
 *              in NMI; no value created, 64 creates failed; the engine's
 *              selem "queued" total up by at least 64 (the frees went through
 *              the engine). Fails where that free is kfree_rcu(), not
 *              NMI-safe (stock 7.3, BROKEN=nc): lockdep splat (IN-NMI usage
 *              of krcp->lock, which fails the run) and the engine's count
 *              unchanged (stock 7.3: no engine stats at all).
 * perf_hw_nmi: the same as nmi_storm with hardware PMU NMIs, where there is
 *              a PMU (not on QEMU TCG: skipped).
 *
 * Every value holds a lsdefer_obj kptr; when the maps are freed, every object
 * created must have been destroyed exactly once.
 *
 * The NMI programs delete and re-create, as real programs do. Creating from
 * NMI works in 7.3, but when the NMI lands on a holder of the storage's lock
 * (-EDEADLK) or loses a creation race, bpf_local_storage_update() frees its
 * new element, and bpf_local_storage_alloc() its new storage, with
 * kfree_rcu(), which is not NMI-safe (lockdep: IN-NMI usage of krcp->lock).
 * With the engine, those frees go through it when in NMI.
 */
#define _GNU_SOURCE
#include <test_progs.h>
#include "cgroup_helpers.h"
#include "ls_defer_helpers.h"
#include "ls_defer_irq.skel.h"

#define CG_PATH			"/ls_defer_nmi"
#define SELF_NMI_RUNS		64
#define CREATE_ERROR_RUNS	64
#define STORM_NMIS		10000
#define STORM_GAP_US		20
#define WORKERS_PER_CPU		2
#define MAX_WORKERS		64
#define PERF_SECS		2

struct nmi_test {
	struct ls_defer_irq *skel;
	struct ls_leak_ck ck;
	int task_fd;
	int cgrp_fd;
	int cgroup_fd;
	__u64 cgid;
};

static int cgroup_fd = -1;
static __u64 cgroup_id;

static bool nmi_test_open(struct nmi_test *t)
{
	memset(t, 0, sizeof(*t));
	if (!ls_leak_begin(&t->ck))
		return false;
	t->skel = ls_defer_irq__open_and_load();
	if (!ASSERT_OK_PTR(t->skel, "ls_defer_irq__open_and_load"))
		return false;
	t->task_fd = bpf_map__fd(t->skel->maps.task_map);
	t->cgrp_fd = bpf_map__fd(t->skel->maps.cgrp_map);
	t->cgroup_fd = cgroup_fd;
	t->cgid = cgroup_id;
	t->skel->bss->target_tgid = getpid();
	t->skel->bss->fill_cgid = cgroup_id;
	return true;
}

/* Destroys the skeleton, then checks that every object was destroyed once */
static void nmi_test_close(struct nmi_test *t)
{
	if (!t->skel)
		return;
	ls_defer_irq__destroy(t->skel);
	t->skel = NULL;
	ls_leak_end(&t->ck);
}

static int run_fill(struct nmi_test *t)
{
	LIBBPF_OPTS(bpf_test_run_opts, opts);
	int err;

	err = bpf_prog_test_run_opts(bpf_program__fd(t->skel->progs.fill), &opts);
	return err ?: (int)opts.retval;
}

static void test_self_nmi(void)
{
	struct ls_defer_stats *st;
	struct ls_defer_uval v;
	struct nmi_test t;
	struct bpf_link *link = NULL;
	int i, pidfd = -1, err;

	if (access(LSDEFER_NMI, W_OK)) {
		printf("%s:SKIP: no %s (no NMI trigger here: see dmesg)\n", __func__, LSDEFER_NMI);
		test__skip();
		return;
	}
	if (!nmi_test_open(&t))
		goto out;
	st = &t.skel->bss->nmi_st;
	t.skel->bss->irq_cgrp = true;
	pidfd = ls_self_pidfd();
	if (!ASSERT_OK_FD(pidfd, "pidfd_open self"))
		goto out;
	link = bpf_program__attach(t.skel->progs.nmi_delete);
	if (!ASSERT_OK_PTR(link, "attach fentry/bpf_lsdefer_nmi_target"))
		goto out;

	for (i = 0; i < SELF_NMI_RUNS; i++) {
		if (!ASSERT_OK(run_fill(&t), "fill"))
			goto out;
		/* the values are there, with the canary the program wrote */
		if (!ASSERT_OK(bpf_map_lookup_elem(t.task_fd, &pidfd, &v), "task value created") ||
		    !ASSERT_EQ(v.canary, LS_DEFER_CANARY, "task value canary") ||
		    !ASSERT_OK(bpf_map_lookup_elem(t.cgrp_fd, &t.cgroup_fd, &v),
			       "cgroup value created"))
			goto out;

		err = ls_write_str(LSDEFER_NMI, "1");
		if (!ASSERT_OK(err, "raise NMI"))
			goto out;

		/* the NMI program deleted both */
		err = bpf_map_lookup_elem(t.task_fd, &pidfd, &v);
		if (!ASSERT_EQ(err ? -errno : 0, -ENOENT, "task value deleted in NMI"))
			break;
		err = bpf_map_lookup_elem(t.cgrp_fd, &t.cgroup_fd, &v);
		if (!ASSERT_EQ(err ? -errno : 0, -ENOENT, "cgroup value deleted in NMI"))
			break;
	}

	ls_print_stats("self_nmi", st);
	ASSERT_EQ(st->runs, SELF_NMI_RUNS, "NMI program runs");
	ASSERT_EQ(st->in_nmi, SELF_NMI_RUNS, "runs in NMI (bpf_lsdefer_ctx)");
	ASSERT_EQ(st->arg_nmi, SELF_NMI_RUNS, "runs in NMI (handler's in_nmi())");
	ASSERT_EQ(st->task_del[LS_RC_OK], SELF_NMI_RUNS, "task storage deletes returned 0");
	ASSERT_EQ(st->cgrp_del[LS_RC_OK], SELF_NMI_RUNS, "cgroup storage deletes returned 0");
	ls_check_no_refusal(st, "NMI");
	ASSERT_EQ(t.skel->bss->fill_st.created, 2 * SELF_NMI_RUNS, "values created");
out:
	bpf_link__destroy(link);
	if (pidfd >= 0)
		close(pidfd);
	nmi_test_close(&t);
}

/*
 * One step of a worker: a syscall delete or update of its own task storage or
 * of the shared cgroup storage, or a cheap syscall. The tp_btf program deletes
 * and re-creates both on each syscall's entry, in task context.
 */
static void churn_step(struct ls_worker *w)
{
	struct ls_defer_uval v = { .canary = LS_DEFER_CHURN };
	struct nmi_test *t = w->ctx;
	int err;

	switch (rand_r(&w->seed) % 4) {
	case 0:
		err = bpf_map_delete_elem(t->task_fd, &w->pidfd);
		break;
	case 1:
		err = bpf_map_delete_elem(t->cgrp_fd, &t->cgroup_fd);
		break;
	case 2:
		err = bpf_map_update_elem(t->task_fd, &w->pidfd, &v, BPF_ANY);
		break;
	default:
		syscall(SYS_getppid);
		return;
	}
	if (!err)
		return;
	switch (errno) {
	case ENOENT:	/* someone else deleted it first */
	case EAGAIN:	/* update raced with the delete of the last element */
	case EDEADLK:	/* rqspinlock */
	case ETIMEDOUT:
	case EBUSY:
	case ENOMEM:
		return;
	default:
		if (!w->err)
			w->err = -errno;
	}
}

static void test_nmi_storm(void)
{
	struct ls_worker w[MAX_WORKERS];
	int nr_cpus = ls_nr_cpus(), target, sender, nw, i, err;
	int stop = 0;
	struct bpf_link *links[2] = {};
	struct ls_defer_stats *st;
	struct nmi_test t;
	char cmd[64];

	if (access(LSDEFER_NMI_STORM, W_OK)) {
		printf("%s:SKIP: no %s (no NMI trigger here: see dmesg)\n", __func__,
		       LSDEFER_NMI_STORM);
		test__skip();
		return;
	}
	if (nr_cpus < 2) {
		printf("%s:SKIP: needs 2 CPUs, one to raise NMIs on the other\n", __func__);
		test__skip();
		return;
	}
	if (!nmi_test_open(&t))
		goto out;
	st = &t.skel->bss->nmi_st;
	t.skel->bss->irq_cgrp = true;
	t.skel->bss->sys_churn = true;
	t.skel->data->sys_churn_loops = LS_SYS_CHURN_LOOPS;
	t.skel->bss->irq_victim = true;
	t.skel->bss->irq_recreate = true;
	links[0] = bpf_program__attach(t.skel->progs.nmi_delete);
	if (!ASSERT_OK_PTR(links[0], "attach fentry/bpf_lsdefer_nmi_target"))
		goto out;
	links[1] = bpf_program__attach(t.skel->progs.sys_enter_churn);
	if (!ASSERT_OK_PTR(links[1], "attach tp_btf/sys_enter"))
		goto out;

	/* NMIs on CPU 0 from CPU 1, then the other way round */
	for (target = 0; target < 2; target++) {
		bool ok = true;

		sender = !target;
		ls_store(&stop, 0);
		memset(w, 0, sizeof(w));
		nw = WORKERS_PER_CPU + 1;
		err = ls_workers_start(w, WORKERS_PER_CPU, churn_step, &t, &stop, target);
		/* and one on the sending CPU, for remote contention */
		err = err ?: ls_workers_start(w + WORKERS_PER_CPU, 1, churn_step, &t, &stop,
					      sender);
		ok &= ASSERT_OK(err, "start workers");
		ok = ok && ASSERT_OK(ls_pin_cpu(sender), "pin to the sending CPU");
		if (ok) {
			snprintf(cmd, sizeof(cmd), "%d %d %d", target, STORM_NMIS,
				 STORM_GAP_US);
			ok &= ASSERT_OK(ls_write_str(LSDEFER_NMI_STORM, cmd), "NMI storm");
		}
		ls_unpin();
		ok &= ASSERT_OK(ls_workers_stop(w, nw, &stop), "worker syscalls");
		for (i = 0; i < nw && ok; i++)
			ok &= ASSERT_GT(w[i].iters, 0, "worker ran");
		if (!ok)
			goto out;
	}

	ls_print_stats("nmi", st);
	ls_print_stats("tp_btf", &t.skel->bss->sys_st);
	ASSERT_GT(st->runs, 0, "NMIs that interrupted a worker");
	ASSERT_EQ(st->in_nmi, st->runs, "NMI program runs in NMI");
	ASSERT_GT(st->task_del[LS_RC_OK], 0, "NMI task storage deletes returned 0");
	ASSERT_GT(st->cgrp_del[LS_RC_OK], 0, "NMI cgroup storage deletes returned 0");
	ls_check_no_refusal(st, "NMI");
	ls_check_no_refusal(&t.skel->bss->sys_st, "tp_btf");
	/* each run re-creates the task and the cgroup value: one outcome each */
	ASSERT_EQ(st->created + st->create_fail + st->obj_fail, 2 * st->runs,
		  "NMI creates counted");
	ASSERT_GT(st->created, 0, "NMI created values");
	ASSERT_GT(t.skel->bss->sys_st.created, 0, "tp_btf created values");
	ASSERT_EQ(lsdefer_cnt(LSDEFER_CNT_NMI_LOST), t.ck.s.v[LSDEFER_CNT_NMI_LOST],
		  "every NMI arrived");
out:
	for (i = 0; i < ARRAY_SIZE(links); i++)
		bpf_link__destroy(links[i]);
	nmi_test_close(&t);
}

static void test_create_error(void)
{
	struct ls_defer_uval v = { .canary = LS_DEFER_CHURN };
	struct ls_engine before, after;
	struct bpf_link *link = NULL;
	struct ls_defer_stats *st;
	int victim_fd, pidfd = -1, err;
	bool engine = false;
	long long locked;
	struct nmi_test t;
	char cmd[16];

	if (access(LSDEFER_NMI_LOCKED, W_OK)) {
		printf("%s:SKIP: no %s (no NMI trigger here: see dmesg)\n", __func__,
		       LSDEFER_NMI_LOCKED);
		test__skip();
		return;
	}
	if (!nmi_test_open(&t))
		goto out;
	st = &t.skel->bss->nmi_st;
	/* delete task_map's value (there is none), then create it */
	t.skel->bss->irq_recreate = true;
	victim_fd = bpf_map__fd(t.skel->maps.victim_map);
	pidfd = ls_self_pidfd();
	if (!ASSERT_OK_FD(pidfd, "pidfd_open self"))
		goto out;

	/*
	 * The thread's storage exists and is not empty, so a create locks it
	 * (an empty one would take bpf_local_storage_alloc() instead); task_map
	 * has no value, so the NMI program's get(F_CREATE) does create.
	 */
	err = bpf_map_update_elem(victim_fd, &pidfd, &v, BPF_NOEXIST);
	if (!ASSERT_OK(err, "victim_map value created"))
		goto out;
	err = bpf_map_lookup_elem(t.task_fd, &pidfd, &v);
	if (!ASSERT_EQ(err ? -errno : 0, -ENOENT, "no task_map value"))
		goto out;
	link = bpf_program__attach(t.skel->progs.nmi_delete);
	if (!ASSERT_OK_PTR(link, "attach fentry/bpf_lsdefer_nmi_target"))
		goto out;

	/* stock 7.3 has no engine: this fails there, and so does the test */
	engine = ASSERT_OK(ls_engine_read(&before), "engine stats");
	locked = lsdefer_cnt(LSDEFER_CNT_NMI_LOCKED);
	snprintf(cmd, sizeof(cmd), "%d", CREATE_ERROR_RUNS);
	err = ls_write_str(LSDEFER_NMI_LOCKED, cmd);
	if (!ASSERT_OK(err, "raise NMIs holding the storage's lock"))
		goto out;

	ls_print_stats("create_error", st);
	ASSERT_EQ(lsdefer_cnt(LSDEFER_CNT_NMI_LOCKED) - locked, CREATE_ERROR_RUNS,
		  "NMIs raised holding the storage's lock");
	ASSERT_EQ(st->runs, CREATE_ERROR_RUNS, "NMI program runs");
	ASSERT_EQ(st->in_nmi, CREATE_ERROR_RUNS, "runs in NMI (bpf_lsdefer_ctx)");
	ASSERT_EQ(st->arg_nmi, CREATE_ERROR_RUNS, "runs in NMI (handler's in_nmi())");
	ASSERT_EQ(st->task_del[LS_RC_ENOENT] + st->task_del[LS_RC_BUSY], CREATE_ERROR_RUNS,
		  "task storage deletes: nothing deleted");
	ls_check_no_refusal(st, "NMI");
	ASSERT_EQ(st->created, 0, "no value created in NMI under the lock");
	ASSERT_EQ(st->create_fail, CREATE_ERROR_RUNS, "NMI creates failed (-EDEADLK)");
	err = bpf_map_lookup_elem(t.task_fd, &pidfd, &v);
	ASSERT_EQ(err ? -errno : 0, -ENOENT, "still no task_map value");
	ASSERT_OK(bpf_map_lookup_elem(victim_fd, &pidfd, &v), "victim_map value still there");
	if (engine && ASSERT_OK(ls_engine_read(&after), "engine stats"))
		ASSERT_GE(after.selem_queued - before.selem_queued, CREATE_ERROR_RUNS,
			  "failed NMI creates freed through the engine");
out:
	bpf_link__destroy(link);
	if (pidfd >= 0)
		close(pidfd);
	nmi_test_close(&t);
}

static void test_perf_hw_nmi(void)
{
	struct perf_event_attr attr = {
		.size = sizeof(attr),
		.type = PERF_TYPE_HARDWARE,
		.config = PERF_COUNT_HW_CPU_CYCLES,
		.freq = 1,
	};
	int nr_cpus = ls_nr_cpus(), nw, i, pfd, err;
	struct bpf_link *links[MAX_WORKERS] = {};
	struct bpf_link *sys_link = NULL;
	struct ls_worker w[MAX_WORKERS];
	int stop = 0;
	struct ls_defer_stats *st;
	struct nmi_test t;

	if (nr_cpus > MAX_WORKERS / WORKERS_PER_CPU)
		nr_cpus = MAX_WORKERS / WORKERS_PER_CPU;
	if (!nmi_test_open(&t))
		goto out;
	st = &t.skel->bss->perf_st;
	t.skel->bss->irq_cgrp = true;
	t.skel->bss->sys_churn = true;
	attr.sample_freq = read_perf_max_sample_freq();

	for (i = 0; i < nr_cpus; i++) {
		pfd = syscall(__NR_perf_event_open, &attr, -1, i, -1, PERF_FLAG_FD_CLOEXEC);
		if (pfd < 0) {
			if (i == 0) {
				printf("%s:SKIP: no hardware PMU (perf_event_open: %d)\n",
				       __func__, -errno);
				test__skip();
				goto out;
			}
			continue;
		}
		links[i] = bpf_program__attach_perf_event(t.skel->progs.perf_delete, pfd);
		if (!ASSERT_OK_PTR(links[i], "attach perf_event")) {
			links[i] = NULL;
			close(pfd);
			goto out;
		}
	}
	sys_link = bpf_program__attach(t.skel->progs.sys_enter_churn);
	if (!ASSERT_OK_PTR(sys_link, "attach tp_btf/sys_enter"))
		goto out;

	nw = nr_cpus * WORKERS_PER_CPU;
	memset(w, 0, sizeof(w));
	err = ls_workers_start(w, nw, churn_step, &t, &stop, INT_MAX);
	if (!ASSERT_OK(err, "start workers")) {
		ls_workers_stop(w, nw, &stop);
		goto out;
	}
	sleep(PERF_SECS);
	ASSERT_OK(ls_workers_stop(w, nw, &stop), "worker syscalls");
	for (i = 0; i < nr_cpus; i++) {
		bpf_link__destroy(links[i]);
		links[i] = NULL;
	}

	ls_print_stats("perf", st);
	ASSERT_GT(st->runs, 0, "PMU program runs for the workers");
	ls_check_no_refusal(st, "PMU");
	if (!st->in_nmi) {
		printf("%s:SKIP: PMU interrupts are not NMIs here\n", __func__);
		test__skip();
		goto out;
	}
	ASSERT_GT(st->task_del[LS_RC_OK], 0, "NMI task storage deletes returned 0");
out:
	bpf_link__destroy(sys_link);
	for (i = 0; i < ARRAY_SIZE(links); i++)
		bpf_link__destroy(links[i]);
	nmi_test_close(&t);
}

void serial_test_ls_defer_nmi(void)
{
	if (!lsdefer_ready())
		return;
	cgroup_fd = test__join_cgroup(CG_PATH);
	if (!ASSERT_OK_FD(cgroup_fd, "join cgroup"))
		return;
	cgroup_id = get_cgroup_id(CG_PATH);
	if (!ASSERT_NEQ(cgroup_id, 0, "cgroup id"))
		goto out;

	if (test__start_subtest("self_nmi"))
		test_self_nmi();
	if (test__start_subtest("nmi_storm"))
		test_nmi_storm();
	if (test__start_subtest("create_error"))
		test_create_error();
	if (test__start_subtest("perf_hw_nmi"))
		test_perf_hw_nmi();
out:
	close(cgroup_fd);
	cgroup_fd = -1;
}
