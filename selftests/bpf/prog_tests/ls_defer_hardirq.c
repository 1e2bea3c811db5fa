// SPDX-License-Identifier: GPL-2.0
/*
 * Delete and re-create task and cgroup local storage from hard interrupt
 * context while task context does the same on the same CPU.
 *
 * A perf_event program on a software cpu-clock event (an hrtimer, so hard
 * interrupt context, on every CPU) deletes and re-creates the storage of
 * whatever task of ours it interrupts. Worker threads on every CPU make
 * getppid() calls whose tp_btf/sys_enter program deletes and re-creates the
 * same storage in task context, with interrupts enabled: the timer lands in
 * the middle of those deletes, and both queue their elements on the same
 * CPU's list. A producer list that is not interrupt-safe (a plain per-CPU
 * list) loses elements or frees them twice there.
 *
 * Every value holds a lsdefer_obj kptr; when the maps are freed, every object
 * created must have been destroyed exactly once, none twice.
 */
#define _GNU_SOURCE
#include <test_progs.h>
#include "cgroup_helpers.h"
#include "ls_defer_helpers.h"
#include "ls_defer_irq.skel.h"

#define CG_PATH			"/ls_defer_hardirq"
#define WORKERS_PER_CPU		2
#define MAX_CPUS		32
#define RUN_SECS		5
/* 20 kHz per CPU; perf throttles it if the guest cannot keep up */
#define SAMPLE_PERIOD_NS	50000

static void getppid_step(struct ls_worker *w)
{
	syscall(SYS_getppid);
}

void serial_test_ls_defer_hardirq(void)
{
	struct perf_event_attr attr = {
		.size = sizeof(attr),
		.type = PERF_TYPE_SOFTWARE,
		.config = PERF_COUNT_SW_CPU_CLOCK,
		.sample_period = SAMPLE_PERIOD_NS,
	};
	struct ls_worker w[MAX_CPUS * WORKERS_PER_CPU];
	struct bpf_link *links[MAX_CPUS] = {};
	int nr_cpus = ls_nr_cpus(), nw = 0, i, pfd, err;
	struct bpf_link *sys_link = NULL;
	struct ls_defer_stats *st, *sys;
	struct ls_defer_irq *skel = NULL;
	struct ls_leak_ck ck;
	int stop = 0;
	int cgroup_fd;

	if (!lsdefer_ready())
		return;
	if (nr_cpus > MAX_CPUS)
		nr_cpus = MAX_CPUS;
	cgroup_fd = test__join_cgroup(CG_PATH);
	if (!ASSERT_OK_FD(cgroup_fd, "join cgroup"))
		return;
	if (!ls_leak_begin(&ck))
		goto out_cg;

	skel = ls_defer_irq__open_and_load();
	if (!ASSERT_OK_PTR(skel, "ls_defer_irq__open_and_load"))
		goto out_cg;
	st = &skel->bss->perf_st;
	sys = &skel->bss->sys_st;
	skel->bss->target_tgid = getpid();
	skel->bss->irq_cgrp = true;
	skel->bss->irq_recreate = true;
	skel->bss->irq_victim = true;
	skel->bss->sys_churn = true;
	skel->data->sys_churn_nr = SYS_getppid;
	skel->data->sys_churn_loops = LS_SYS_CHURN_LOOPS;

	for (i = 0; i < nr_cpus; i++) {
		pfd = syscall(__NR_perf_event_open, &attr, -1, i, -1, PERF_FLAG_FD_CLOEXEC);
		if (pfd < 0) {
			if (i == 0) {
				printf("%s:SKIP: no cpu-clock perf event (%d)\n", __func__, -errno);
				test__skip();
				goto out;
			}
			continue;
		}
		links[i] = bpf_program__attach_perf_event(skel->progs.perf_delete, pfd);
		if (!ASSERT_OK_PTR(links[i], "attach perf_event")) {
			links[i] = NULL;
			close(pfd);
			goto out;
		}
	}
	sys_link = bpf_program__attach(skel->progs.sys_enter_churn);
	if (!ASSERT_OK_PTR(sys_link, "attach tp_btf/sys_enter"))
		goto out;

	memset(w, 0, sizeof(w));
	nw = nr_cpus * WORKERS_PER_CPU;
	err = ls_workers_start(w, nw, getppid_step, NULL, &stop, INT_MAX);
	if (ASSERT_OK(err, "start workers"))
		sleep(RUN_SECS);
	ls_workers_stop(w, nw, &stop);
	for (i = 0; i < nr_cpus; i++) {
		bpf_link__destroy(links[i]);
		links[i] = NULL;
	}
	bpf_link__destroy(sys_link);
	sys_link = NULL;

	ls_print_stats("perf", st);
	ls_print_stats("tp_btf", sys);
	ASSERT_GT(st->runs, 0, "timer program runs for the workers");
	ASSERT_EQ(st->in_nmi, 0, "cpu-clock is not an NMI");
	ASSERT_EQ(st->in_hardirq, st->runs, "timer program runs in hard interrupt context");
	ASSERT_GT(st->task_del[LS_RC_OK], 0, "hardirq task storage deletes returned 0");
	ASSERT_GT(st->created, 0, "hardirq re-created values");
	/* What the test exists for: a hard interrupt delete inside a task one */
	ASSERT_GT(st->in_task_del, 0, "timer landed in a task-context delete on its CPU");
	ASSERT_EQ(st->task_del[LS_RC_OTHER] + st->cgrp_del[LS_RC_OTHER], 0,
		  "hardirq delete: unexpected error");
	ASSERT_GT(sys->task_del[LS_RC_OK], 0, "task context deletes returned 0");
	ASSERT_EQ(sys->task_del[LS_RC_OTHER] + sys->cgrp_del[LS_RC_OTHER], 0,
		  "task context delete: unexpected error");
	for (i = 0; i < nw; i++)
		if (!ASSERT_GT(w[i].iters, 0, "worker ran"))
			break;
out:
	bpf_link__destroy(sys_link);
	for (i = 0; i < ARRAY_SIZE(links); i++)
		bpf_link__destroy(links[i]);
	if (skel) {
		ls_defer_irq__destroy(skel);
		ls_leak_end(&ck);
	}
out_cg:
	close(cgroup_fd);
}
