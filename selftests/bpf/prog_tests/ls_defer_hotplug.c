// SPDX-License-Identifier: GPL-2.0
/*
 * Take CPU 1 offline and back online, again and again, while task, hard
 * interrupt and NMI programs delete and re-create task and cgroup local
 * storage on both CPUs.
 *
 * Guards the engine's CPU hotplug handling: objects queued on a CPU that goes
 * down are still freed, each once. What CPU 1 queued while online has its
 * irq_work run as the CPU dies (smpcfd_dying_cpu()); a grace period in flight
 * for its batch completes, and chains for what followed, on CPU 0. Objects
 * left on its list with no irq_work queued are picked up by the engine's
 * cpuhp "dead" callback's kick while it is down, or by the "online" one's
 * once it is back, and a map free takes offline CPUs' lists too. Only a
 * producer that found its CPU not online leaves them so (the cpu_online()
 * check before irq_work_queue()): an NMI in a CPU's last or first moments,
 * which the NMIs here, each raised by a CPU on itself with preemption
 * disabled, never are; and CPU 1 is back online before the maps are freed.
 * Those windows are for the KUnit tests flush_and_cpu_hotplug and
 * cpuhp_callbacks_kick_leftovers, which drive them directly. This is their
 * guest-level counterpart, with real programs, maps and CPU hotplug: the
 * callbacks run at every cycle, and nothing queued around them may be lost
 * or freed twice.
 *
 * Two worker threads pinned to each of CPU 0 and CPU 1 make getppid() calls,
 * whose tp_btf/sys_enter program deletes and re-creates the storage
 * LS_SYS_CHURN_LOOPS times in task context, and every few steps raise an NMI
 * on their own CPU through lsdefer_testmod, whose fentry program deletes and
 * re-creates it in NMI. A cpu-clock perf_event program does the same from
 * hard interrupt context (CPU 1's event is detached at its first offline and
 * not re-attached). A worker whose CPU went offline runs on CPU 0 until CPU 1
 * is back, then pins itself to it again. The test thread meanwhile writes 0
 * and 1 to CPU 1's online file, 30 to 100 ms apart, for RUN_SECS. The harness
 * boots 2 vCPUs, so only CPU 1 is toggled.
 *
 * Every value holds a lsdefer_obj kptr; when the maps are freed, every object
 * created must have been destroyed exactly once, and every selem and storage
 * the test queued on the engine freed. Skipped without a CPU 1 that can go
 * offline, and on the stock kernel (no engine).
 */
#define _GNU_SOURCE
#include <test_progs.h>
#include "cgroup_helpers.h"
#include "ls_defer_helpers.h"
#include "ls_defer_irq.skel.h"

#define CG_PATH			"/ls_defer_hotplug"
#define CPU1_ONLINE		"/sys/devices/system/cpu/cpu1/online"
#define WORKERS_PER_CPU		2
#define NR_WORKERS		(2 * WORKERS_PER_CPU)
#define MAX_CPUS		32
#define RUN_SECS		6
#define MAX_CYCLES		200
#define GAP_MIN_MS		30
#define GAP_MAX_MS		100
/* Longest retry of a hotplug write that keeps failing with -EBUSY */
#define HOTPLUG_RETRY_MS	10000
/* Longest wait for the workers' first steps */
#define WORKER_START_MS		10000
/* One step in NMI_EVERY raises an NMI, the others make a getppid() */
#define NMI_EVERY		8
/* 20 kHz per CPU; perf throttles it if the guest cannot keep up */
#define SAMPLE_PERIOD_NS	50000

/* Shared by the workers and the test thread */
struct hotplug_ctx {
	long nmi_ok;		/* NMIs raised and handled */
	long nmi_err;		/* NMI writes that failed, tolerated */
	long nmi_last_err;
	long repins;		/* workers that pinned themselves to their CPU again */
	long busy;		/* hotplug writes that failed with -EBUSY, retried */
	__u64 max_offline_ns, max_online_ns;
};

static void ctx_add(long *p, long v)
{
	__atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

/* 1 or 0: CPU 1's online file; -errno if it cannot be read */
static int cpu1_state(void)
{
	char c = 0;
	int fd, n;

	fd = open(CPU1_ONLINE, O_RDONLY);
	if (fd < 0)
		return -errno;
	n = read(fd, &c, 1);
	close(fd);
	if (n != 1)
		return -EIO;
	return c == '1';
}

/*
 * Writes val to CPU 1's online file; while it fails with -EBUSY (or -EAGAIN),
 * counts it and retries for at most HOTPLUG_RETRY_MS. Returns the last error.
 */
static int cpu1_set(struct hotplug_ctx *c, const char *val, __u64 *max_ns)
{
	__u64 deadline = get_time_ns() + HOTPLUG_RETRY_MS * 1000000ULL;
	__u64 t0, dt;
	int err;

	for (;;) {
		t0 = get_time_ns();
		err = ls_write_str(CPU1_ONLINE, val);
		dt = get_time_ns() - t0;
		if (max_ns && !err && dt > *max_ns)
			*max_ns = dt;
		if (err != -EBUSY && err != -EAGAIN)
			return err;
		c->busy++;
		if (get_time_ns() > deadline)
			return err;
		usleep(GAP_MIN_MS * 1000);
	}
}

/* Brings CPU 1 online (bounded retries); true once its online file says so */
static bool cpu1_up(struct hotplug_ctx *c)
{
	int err = cpu1_set(c, "1", NULL);
	int state = cpu1_state();

	if (err || state != 1)
		printf("%s: write 1 to %s: %d, online %d\n", __func__, CPU1_ONLINE, err, state);
	return !err && state == 1;
}

static unsigned int gap_us(unsigned int *seed)
{
	return (GAP_MIN_MS + rand_r(seed) % (GAP_MAX_MS - GAP_MIN_MS + 1)) * 1000;
}

/*
 * One step of a worker: back onto its CPU if hotplug moved it away and the
 * CPU is online again; then a getppid() (tp_btf churn, task context) or an
 * NMI on the CPU it runs on (NMI churn). An NMI write may fail while CPU 1
 * goes down: counted, not an error.
 */
static void hotplug_step(struct ls_worker *w)
{
	struct hotplug_ctx *c = w->ctx;
	int err;

	if (sched_getcpu() != w->cpu && !ls_pin_cpu(w->cpu))
		ctx_add(&c->repins, 1);
	if (w->iters % NMI_EVERY) {
		syscall(SYS_getppid);
		return;
	}
	err = ls_write_str(LSDEFER_NMI, "1");
	switch (err) {
	case 0:
		ctx_add(&c->nmi_ok, 1);
		return;
	case -EINTR:
	case -ETIMEDOUT:	/* the NMI did not arrive within 1 s */
	case -ENODEV:
	case -ENXIO:
	case -EBUSY:
	case -EAGAIN:
		ctx_add(&c->nmi_err, 1);
		__atomic_store_n(&c->nmi_last_err, err, __ATOMIC_RELAXED);
		return;
	default:
		if (!w->err)
			w->err = err;
	}
}

/* Waits (at most WORKER_START_MS) until every worker has made a step */
static bool workers_running(const struct ls_worker *w)
{
	__u64 deadline = get_time_ns() + WORKER_START_MS * 1000000ULL;
	int i;

	for (i = 0; i < NR_WORKERS; i++) {
		while (!__atomic_load_n(&w[i].iters, __ATOMIC_RELAXED)) {
			if (get_time_ns() > deadline)
				return false;
			usleep(1000);
		}
	}
	return true;
}

static void print_engine(const char *when, const struct ls_engine *e)
{
	printf("engine %s: selem queued %lld freed %lld storage queued %lld freed %lld\n",
	       when, e->selem_queued, e->selem_freed, e->storage_queued, e->storage_freed);
}

void serial_test_ls_defer_hotplug(void)
{
	struct perf_event_attr attr = {
		.size = sizeof(attr),
		.type = PERF_TYPE_SOFTWARE,
		.config = PERF_COUNT_SW_CPU_CLOCK,
		.sample_period = SAMPLE_PERIOD_NS,
	};
	struct bpf_link *links[MAX_CPUS] = {};
	struct bpf_link *nmi_link = NULL, *sys_link = NULL;
	struct ls_defer_stats *nmi, *perf, *sys;
	struct ls_defer_irq *skel = NULL;
	struct ls_worker w[NR_WORKERS];
	struct ls_engine before, after;
	struct hotplug_ctx c = {};
	int nr_cpus, i, pfd, err, cycles = 0, cgroup_fd = -1;
	unsigned int seed = 1;
	struct ls_leak_ck ck;
	__u64 deadline;
	long long lost;
	int stop = 0;

	if (!lsdefer_ready())
		return;
	if (access(LS_ENGINE_STATS, R_OK)) {
		printf("%s:SKIP: no %s (stock kernel: no engine)\n", __func__, LS_ENGINE_STATS);
		test__skip();
		return;
	}
	if (access(LSDEFER_NMI, W_OK)) {
		printf("%s:SKIP: no %s (the NMI trigger is x86-only)\n", __func__, LSDEFER_NMI);
		test__skip();
		return;
	}
	if (access(CPU1_ONLINE, W_OK)) {
		printf("%s:SKIP: %s missing or not writable (%d)\n", __func__, CPU1_ONLINE,
		       -errno);
		test__skip();
		return;
	}
	/* From here on, every exit path brings CPU 1 back online */
	if (!ASSERT_TRUE(cpu1_up(&c), "CPU 1 online at the start"))
		return;
	if (ls_nr_cpus() < 2) {
		printf("%s:SKIP: needs 2 online CPUs, CPU 1 to take offline\n", __func__);
		test__skip();
		return;
	}
	memset(w, 0, sizeof(w));
	nr_cpus = libbpf_num_possible_cpus();
	if (!ASSERT_GE(nr_cpus, 2, "possible CPUs"))
		goto out;
	if (nr_cpus > MAX_CPUS)
		nr_cpus = MAX_CPUS;

	cgroup_fd = test__join_cgroup(CG_PATH);
	if (!ASSERT_OK_FD(cgroup_fd, "join cgroup"))
		goto out;
	if (!ls_leak_begin(&ck) || !ASSERT_OK(ls_engine_read(&before), "engine stats"))
		goto out;

	skel = ls_defer_irq__open_and_load();
	if (!ASSERT_OK_PTR(skel, "ls_defer_irq__open_and_load"))
		goto out;
	nmi = &skel->bss->nmi_st;
	perf = &skel->bss->perf_st;
	sys = &skel->bss->sys_st;
	skel->bss->target_tgid = getpid();
	skel->bss->irq_cgrp = true;
	skel->bss->irq_recreate = true;
	skel->bss->irq_victim = true;
	skel->bss->sys_churn = true;
	skel->data->sys_churn_loops = LS_SYS_CHURN_LOOPS;

	/* Every possible CPU; CPUs 0 and 1 are online now and must work */
	for (i = 0; i < nr_cpus; i++) {
		pfd = syscall(__NR_perf_event_open, &attr, -1, i, -1, PERF_FLAG_FD_CLOEXEC);
		if (pfd < 0) {
			if (i == 0) {
				printf("%s:SKIP: no cpu-clock perf event (%d)\n", __func__, -errno);
				test__skip();
				goto out;
			}
			/* a CPU above 1 may be offline */
			if (i == 1 && !ASSERT_OK_FD(pfd, "cpu-clock perf event on CPU 1"))
				goto out;
			continue;
		}
		links[i] = bpf_program__attach_perf_event(skel->progs.perf_delete, pfd);
		if (!ASSERT_OK_PTR(links[i], "attach perf_event")) {
			links[i] = NULL;
			close(pfd);
			goto out;
		}
	}
	nmi_link = bpf_program__attach(skel->progs.nmi_delete);
	if (!ASSERT_OK_PTR(nmi_link, "attach fentry/bpf_lsdefer_nmi_target"))
		goto out;
	sys_link = bpf_program__attach(skel->progs.sys_enter_churn);
	if (!ASSERT_OK_PTR(sys_link, "attach tp_btf/sys_enter"))
		goto out;

	err = ls_workers_start(w, WORKERS_PER_CPU, hotplug_step, &c, &stop, 1);
	err = err ?: ls_workers_start(w + WORKERS_PER_CPU, WORKERS_PER_CPU, hotplug_step, &c,
				      &stop, 0);
	if (!ASSERT_OK(err, "start workers"))
		goto out;
	/* each pinned itself (CPU 1 must still be online for that) and ran */
	if (!ASSERT_TRUE(workers_running(w), "workers running within 10 s"))
		goto out;

	deadline = get_time_ns() + RUN_SECS * 1000000000ULL;
	while (cycles < MAX_CYCLES && get_time_ns() < deadline) {
		err = cpu1_set(&c, "0", &c.max_offline_ns);
		if (!ASSERT_OK(err, "take CPU 1 offline (write 0)"))
			break;
		usleep(gap_us(&seed));
		err = cpu1_set(&c, "1", &c.max_online_ns);
		if (!ASSERT_OK(err, "bring CPU 1 back online (write 1)"))
			break;
		cycles++;
		usleep(gap_us(&seed));
	}

	ASSERT_OK(ls_workers_stop(w, NR_WORKERS, &stop), "worker NMI writes and pinning");
	for (i = 0; i < nr_cpus; i++) {
		bpf_link__destroy(links[i]);
		links[i] = NULL;
	}
	bpf_link__destroy(nmi_link);
	nmi_link = NULL;
	bpf_link__destroy(sys_link);
	sys_link = NULL;

	lost = lsdefer_cnt(LSDEFER_CNT_NMI_LOST) - ck.s.v[LSDEFER_CNT_NMI_LOST];
	printf("hotplug: cycles %d busy %ld longest offline %llu ms online %llu ms\n",
	       cycles, c.busy, c.max_offline_ns / 1000000, c.max_online_ns / 1000000);
	printf("workers: nmi writes ok %ld failed %ld (last %ld) lost %lld repins %ld\n",
	       c.nmi_ok, c.nmi_err, c.nmi_last_err, lost, c.repins);
	for (i = 0; i < NR_WORKERS; i++)
		printf("worker %d (CPU %d): %lu steps\n", i, w[i].cpu, w[i].iters);
	ls_print_stats("nmi", nmi);
	ls_print_stats("perf", perf);
	ls_print_stats("tp_btf", sys);

	ASSERT_GT(cycles, 0, "CPU 1 went offline and online");
	for (i = 0; i < NR_WORKERS; i++)
		if (!ASSERT_GT(w[i].iters, 0, "worker ran"))
			break;
	ASSERT_GT(nmi->in_nmi, 0, "NMI program runs in NMI");
	ASSERT_EQ(nmi->in_nmi, nmi->runs, "every NMI program run in NMI");
	ASSERT_GT(nmi->task_del[LS_RC_OK], 0, "NMI task storage deletes returned 0");
	ASSERT_GT(perf->runs, 0, "timer program runs for the workers");
	ASSERT_EQ(perf->in_hardirq, perf->runs, "timer program runs in hard interrupt context");
	ASSERT_GT(sys->task_del[LS_RC_OK], 0, "tp_btf task storage deletes returned 0");
	ls_check_no_refusal(nmi, "NMI");
	ls_check_no_refusal(perf, "hardirq");
	ls_check_no_refusal(sys, "tp_btf");
out:
	ls_workers_stop(w, NR_WORKERS, &stop);
	ASSERT_TRUE(cpu1_up(&c), "CPU 1 online at the end");
	bpf_link__destroy(sys_link);
	bpf_link__destroy(nmi_link);
	for (i = 0; i < ARRAY_SIZE(links); i++)
		bpf_link__destroy(links[i]);
	if (skel) {
		ls_defer_irq__destroy(skel);
		/* objects destroyed once, selems freed, storages freed by the chain */
		ls_leak_end(&ck);
		print_engine("before", &before);
		if (ASSERT_OK(ls_engine_read(&after), "engine stats"))
			print_engine("after", &after);
	}
	if (cgroup_fd >= 0)
		close(cgroup_fd);
}
