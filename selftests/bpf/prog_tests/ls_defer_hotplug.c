// SPDX-License-Identifier: GPL-2.0
/*
 * Take CPUs offline and back online, again and again, several at a time when
 * there are enough, while task, hard interrupt and NMI programs delete and
 * re-create task and cgroup local storage on every CPU.
 *
 * Guards the engine's CPU hotplug handling: objects queued on a CPU that goes
 * down are still freed, each once. What a CPU queued while online has its
 * irq_work run as the CPU dies (smpcfd_dying_cpu()); a grace period in flight
 * for its batch completes, and chains for what followed, on a CPU that is
 * still online, which may be the next to go down. Objects left on its list
 * with no irq_work queued are picked up by the engine's cpuhp "dead"
 * callback's kick while it is down, or by the "online" one's once it is back,
 * and a map free takes offline CPUs' lists too. Only a producer that found
 * its CPU not online leaves them so (the cpu_online() check before
 * irq_work_queue()): an NMI in a CPU's last or first moments, which the NMIs
 * here, each raised by a CPU on itself with preemption disabled, never are;
 * and every CPU is back online before the maps are freed. Those windows are
 * for the KUnit tests flush_and_cpu_hotplug and
 * cpuhp_callbacks_kick_leftovers, which drive them directly. This is their
 * guest-level counterpart, with real programs, maps and CPU hotplug: the
 * callbacks run at every offline and online, and nothing queued around them
 * may be lost or freed twice.
 *
 * The CPUs of the test are CPU 0 and every other CPU below MAX_CPUS whose
 * /sys/devices/system/cpu/cpuN/online is writable, all brought online at the
 * start. WORKERS_PER_CPU worker threads pinned to each make getppid() calls,
 * whose tp_btf/sys_enter program deletes and re-creates the storage
 * LS_SYS_CHURN_LOOPS times in task context, and every few steps raise an NMI
 * on their own CPU through lsdefer_testmod, whose fentry program deletes and
 * re-creates it in NMI. A cpu-clock perf_event program on each does the same
 * from hard interrupt context; perf detaches a CPU's event as the CPU goes
 * offline, and the test attaches a new one each time it brings the CPU back.
 * A worker whose CPU went offline runs on any online CPU until its CPU is
 * back, then pins itself to it again.
 *
 * The test thread toggles every CPU of the test but CPU 0 for RUN_SECS, one
 * write to an online file at a time, 30 to 100 ms apart. At each step it
 * picks a CPU at random (rand_r(); the seed is printed, and LS_HOTPLUG_SEED
 * replays the same choices) and takes it offline, or brings it back online
 * if it was offline: a random walk over the number of CPUs offline, which
 * keeps CPU 0 and one other online. With 2 CPUs, CPU 1 alone goes offline and
 * back; with 3, one of CPUs 1 and 2 at a time; with 4 or more, several at the
 * same time: the first time one is offline, another follows whatever the
 * draw, and the test asserts that it happened. Every CPU is brought back
 * online before the workers stop. Each CPU's offline cycles (offline, then
 * back online) are printed; the test asserts on their total, since the walk
 * need not pick every CPU. The harness boots 2 vCPUs unless VM_CPUS says
 * otherwise.
 *
 * Every value holds a lsdefer_obj kptr; when the maps are freed, every object
 * created must have been destroyed exactly once, and every selem and storage
 * the test queued on the engine freed. Skipped without a CPU other than CPU 0
 * that can go offline, and on the stock kernel (no engine).
 *
 * map_free() runs with migration disabled (bpf_map_free()), and map free
 * waits for its map's deferred selems: a map free stuck there (a broken
 * engine) pins its worker to a CPU, and taking that CPU offline then waits
 * for it forever, in sched_cpu_wait_empty(). So the test fails at once,
 * without touching a CPU, when an earlier test saw its maps never freed.
 */
#define _GNU_SOURCE
#include <test_progs.h>
#include "cgroup_helpers.h"
#include "ls_defer_helpers.h"
#include "ls_defer_irq.skel.h"

#define CG_PATH			"/ls_defer_hotplug"
#define CPU_ONLINE_FMT		"/sys/devices/system/cpu/cpu%d/online"
#define WORKERS_PER_CPU		2
#define MAX_CPUS		32
#define RUN_SECS		6
/* Most offline cycles (a CPU taken offline and back online), all CPUs */
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

/* The test thread's: the CPUs it toggles, their timer events, its counts */
struct hotplug_cpus {
	struct hotplug_ctx *c;
	struct bpf_program *perf_prog;
	struct bpf_link *links[MAX_CPUS];	/* timer events, CPU 0's included */
	bool toggled[MAX_CPUS];	/* can go offline; never CPU 0 */
	bool off[MAX_CPUS];	/* offline now */
	int cycles[MAX_CPUS];	/* times taken offline and brought back online */
	int nr_toggled;
	int nr_off;		/* offline now */
	int max_off;		/* most offline at a time: nr_toggled - 1, at least 1 */
	int most_off;		/* most that were */
	int multi;		/* offlines while another CPU was offline */
	int total_cycles;
	unsigned int seed;
};

static void ctx_add(long *p, long v)
{
	__atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

/* CPU 0 and the toggled CPUs: workers and a timer event on each */
static bool cpu_used(const struct hotplug_cpus *h, int cpu)
{
	return !cpu || h->toggled[cpu];
}

static void online_path(char *buf, size_t len, int cpu)
{
	snprintf(buf, len, CPU_ONLINE_FMT, cpu);
}

/* 1 or 0: cpu's online file; -errno if it cannot be read */
static int cpu_state(int cpu)
{
	char path[64], c = 0;
	int fd, n;

	online_path(path, sizeof(path), cpu);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -errno;
	n = read(fd, &c, 1);
	close(fd);
	if (n != 1)
		return -EIO;
	return c == '1';
}

/*
 * Writes val to cpu's online file; while it fails with -EBUSY (or -EAGAIN),
 * counts it and retries for at most HOTPLUG_RETRY_MS. Returns the last error.
 */
static int cpu_set(struct hotplug_ctx *c, int cpu, const char *val, __u64 *max_ns)
{
	__u64 deadline = get_time_ns() + HOTPLUG_RETRY_MS * 1000000ULL;
	__u64 t0, dt;
	char path[64];
	int err;

	online_path(path, sizeof(path), cpu);
	for (;;) {
		t0 = get_time_ns();
		err = ls_write_str(path, val);
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

/* Brings cpu online (bounded retries); true once its online file says so */
static bool cpu_up(struct hotplug_ctx *c, int cpu)
{
	int err = cpu_set(c, cpu, "1", NULL);
	int state = cpu_state(cpu);

	if (err || state != 1)
		printf("%s: write 1 to " CPU_ONLINE_FMT ": %d, online %d\n", __func__, cpu, err,
		       state);
	return !err && state == 1;
}

/* Every toggled CPU online; "CPU n online <when>" asserted for each */
static bool cpus_up(struct hotplug_cpus *h, const char *when)
{
	char msg[64];
	bool ok = true;
	int cpu;

	for (cpu = 1; cpu < MAX_CPUS; cpu++) {
		if (!h->toggled[cpu])
			continue;
		snprintf(msg, sizeof(msg), "CPU %d online %s", cpu, when);
		ok &= ASSERT_TRUE(cpu_up(h->c, cpu), msg);
	}
	return ok;
}

static unsigned int gap_us(unsigned int *seed)
{
	return (GAP_MIN_MS + rand_r(seed) % (GAP_MAX_MS - GAP_MIN_MS + 1)) * 1000;
}

/* A cpu-clock event on cpu: its fd, or -1 with errno set */
static int perf_open(int cpu)
{
	struct perf_event_attr attr = {
		.size = sizeof(attr),
		.type = PERF_TYPE_SOFTWARE,
		.config = PERF_COUNT_SW_CPU_CLOCK,
		.sample_period = SAMPLE_PERIOD_NS,
	};

	return syscall(__NR_perf_event_open, &attr, -1, cpu, -1, PERF_FLAG_FD_CLOEXEC);
}

/* Replaces cpu's timer event by pfd (perf_open()'s) and attaches the program */
static bool perf_attach(struct hotplug_cpus *h, int cpu, int pfd)
{
	char msg[64];

	bpf_link__destroy(h->links[cpu]);
	h->links[cpu] = NULL;
	snprintf(msg, sizeof(msg), "cpu-clock perf event on CPU %d", cpu);
	if (!ASSERT_OK_FD(pfd, msg))
		return false;
	h->links[cpu] = bpf_program__attach_perf_event(h->perf_prog, pfd);
	if (!ASSERT_OK_PTR(h->links[cpu], "attach perf_event")) {
		h->links[cpu] = NULL;
		close(pfd);
		return false;
	}
	return true;
}

/* A toggled CPU, chosen at random among those offline (off) or online */
static int pick_cpu(struct hotplug_cpus *h, bool off)
{
	int cpu, n = 0, k;

	for (cpu = 1; cpu < MAX_CPUS; cpu++)
		n += h->toggled[cpu] && h->off[cpu] == off;
	if (!n)
		return -1;
	k = rand_r(&h->seed) % n;
	for (cpu = 1; cpu < MAX_CPUS; cpu++)
		if (h->toggled[cpu] && h->off[cpu] == off && !k--)
			return cpu;
	return -1;
}

/*
 * Brings cpu back online (up) or takes it offline, and counts it; a CPU
 * back online gets a new timer event. False (asserted) if that failed.
 */
static bool cpu_toggle(struct hotplug_cpus *h, int cpu, bool up)
{
	struct hotplug_ctx *c = h->c;
	char msg[64];
	int err;

	if (cpu < 0) {
		printf("%s: no CPU %s\n", __func__, up ? "offline" : "online");
		return false;
	}
	err = cpu_set(c, cpu, up ? "1" : "0", up ? &c->max_online_ns : &c->max_offline_ns);
	snprintf(msg, sizeof(msg), "%s CPU %d %s", up ? "bring" : "take", cpu,
		 up ? "back online (write 1)" : "offline (write 0)");
	if (!ASSERT_OK(err, msg))
		return false;
	h->off[cpu] = !up;
	if (!up) {
		if (++h->nr_off > 1)
			h->multi++;
		if (h->nr_off > h->most_off)
			h->most_off = h->nr_off;
		return true;
	}
	h->nr_off--;
	h->cycles[cpu]++;
	h->total_cycles++;
	return perf_attach(h, cpu, perf_open(cpu));
}

/*
 * One step of the random walk: a toggled CPU chosen at random goes offline,
 * or back online if it was offline. None offline: one goes; max_off offline:
 * one comes back. Until two CPUs have been offline at the same time, a second
 * one follows the first whatever the draw, if max_off allows it.
 */
static bool hotplug_walk(struct hotplug_cpus *h)
{
	bool up;

	if (!h->nr_off)
		up = false;
	else if (h->nr_off >= h->max_off)
		up = true;
	else if (!h->multi)
		up = false;
	else
		up = rand_r(&h->seed) % h->nr_toggled < h->nr_off;
	return cpu_toggle(h, pick_cpu(h, up), up);
}

/*
 * One step of a worker: back onto its CPU if hotplug moved it away and the
 * CPU is online again; then a getppid() (tp_btf churn, task context) or an
 * NMI on the CPU it runs on (NMI churn). An NMI write may fail while its CPU
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

/* Waits (at most WORKER_START_MS) until each of the nw workers has made a step */
static bool workers_running(const struct ls_worker *w, int nw)
{
	__u64 deadline = get_time_ns() + WORKER_START_MS * 1000000ULL;
	int i;

	for (i = 0; i < nw; i++) {
		while (!__atomic_load_n(&w[i].iters, __ATOMIC_RELAXED)) {
			if (get_time_ns() > deadline)
				return false;
			usleep(1000);
		}
	}
	return true;
}

/* LS_HOTPLUG_SEED if set (to replay a run's choices), else from the clock */
static unsigned int hotplug_seed(void)
{
	const char *s = getenv("LS_HOTPLUG_SEED");

	if (s && *s)
		return strtoul(s, NULL, 0);
	return get_time_ns() ^ getpid();
}

static void print_engine(const char *when, const struct ls_engine *e)
{
	printf("engine %s: selem queued %lld freed %lld storage queued %lld freed %lld\n",
	       when, e->selem_queued, e->selem_freed, e->storage_queued, e->storage_freed);
}

void serial_test_ls_defer_hotplug(void)
{
	struct ls_worker w[MAX_CPUS * WORKERS_PER_CPU];
	struct bpf_link *nmi_link = NULL, *sys_link = NULL;
	struct ls_defer_stats *nmi, *perf, *sys;
	struct ls_defer_irq *skel = NULL;
	struct ls_engine before, after;
	struct hotplug_ctx c = {};
	struct hotplug_cpus h = { .c = &c };
	int nr_cpus, cpu, i, pfd, err, nw = 0, cgroup_fd = -1;
	char path[64];
	struct ls_leak_ck ck;
	__u64 deadline;
	long long lost;
	int stop = 0;
	bool ok;

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
	nr_cpus = libbpf_num_possible_cpus();
	if (!ASSERT_GE(nr_cpus, 2, "possible CPUs"))
		return;
	if (nr_cpus > MAX_CPUS)
		nr_cpus = MAX_CPUS;
	for (cpu = 1; cpu < nr_cpus; cpu++) {
		online_path(path, sizeof(path), cpu);
		h.toggled[cpu] = !access(path, W_OK);
		h.nr_toggled += h.toggled[cpu];
	}
	if (!h.nr_toggled) {
		printf("%s:SKIP: no CPU but 0 can go offline (no writable cpuN/online, N < %d)\n",
		       __func__, nr_cpus);
		test__skip();
		return;
	}
	if (!ASSERT_FALSE(ls_map_free_stuck,
			  "no map free stuck (taking its CPU offline would wait for it forever)"))
		return;
	/* From here on, every exit path brings every toggled CPU back online */
	if (!cpus_up(&h, "at the start"))
		return;
	/* CPU 0 and one other stay online; with 2 CPUs, CPU 1 goes alone */
	h.max_off = h.nr_toggled > 1 ? h.nr_toggled - 1 : 1;
	h.seed = hotplug_seed();
	printf("hotplug: %d CPUs, %d toggled, at most %d offline at a time, seed %u\n",
	       h.nr_toggled + 1, h.nr_toggled, h.max_off, h.seed);
	memset(w, 0, sizeof(w));

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
	h.perf_prog = skel->progs.perf_delete;

	/* Every CPU of the test is online now and must take an event */
	for (cpu = 0; cpu < nr_cpus; cpu++) {
		if (!cpu_used(&h, cpu))
			continue;
		pfd = perf_open(cpu);
		if (pfd < 0 && !cpu) {
			printf("%s:SKIP: no cpu-clock perf event (%d)\n", __func__, -errno);
			test__skip();
			goto out;
		}
		if (!perf_attach(&h, cpu, pfd))
			goto out;
	}
	nmi_link = bpf_program__attach(skel->progs.nmi_delete);
	if (!ASSERT_OK_PTR(nmi_link, "attach fentry/bpf_lsdefer_nmi_target"))
		goto out;
	sys_link = bpf_program__attach(skel->progs.sys_enter_churn);
	if (!ASSERT_OK_PTR(sys_link, "attach tp_btf/sys_enter"))
		goto out;

	for (cpu = 0, err = 0; cpu < nr_cpus && !err; cpu++) {
		if (!cpu_used(&h, cpu))
			continue;
		err = ls_workers_start(w + nw, WORKERS_PER_CPU, hotplug_step, &c, &stop, cpu);
		nw += WORKERS_PER_CPU;
	}
	if (!ASSERT_OK(err, "start workers"))
		goto out;
	/* each pinned itself (every CPU must still be online for that) and ran */
	if (!ASSERT_TRUE(workers_running(w, nw), "workers running within 10 s"))
		goto out;

	deadline = get_time_ns() + RUN_SECS * 1000000000ULL;
	ok = true;
	while (ok && h.total_cycles < MAX_CYCLES && get_time_ns() < deadline) {
		ok = hotplug_walk(&h);
		usleep(gap_us(&h.seed));
	}
	/* Every CPU back online while the workers still run: each step ends one */
	while (ok && h.nr_off)
		ok = cpu_toggle(&h, pick_cpu(&h, true), true);

	ASSERT_OK(ls_workers_stop(w, nw, &stop), "worker NMI writes and pinning");
	for (cpu = 0; cpu < nr_cpus; cpu++) {
		bpf_link__destroy(h.links[cpu]);
		h.links[cpu] = NULL;
	}
	bpf_link__destroy(nmi_link);
	nmi_link = NULL;
	bpf_link__destroy(sys_link);
	sys_link = NULL;

	lost = lsdefer_cnt(LSDEFER_CNT_NMI_LOST) - ck.s.v[LSDEFER_CNT_NMI_LOST];
	printf("hotplug: cycles %d busy %ld longest offline %llu ms online %llu ms\n",
	       h.total_cycles, c.busy, c.max_offline_ns / 1000000, c.max_online_ns / 1000000);
	printf("hotplug: most offline at once %d, offlines while another CPU was offline %d\n",
	       h.most_off, h.multi);
	for (cpu = 1; cpu < nr_cpus; cpu++)
		if (h.toggled[cpu])
			printf("hotplug: CPU %d: %d offline cycles\n", cpu, h.cycles[cpu]);
	printf("workers: nmi writes ok %ld failed %ld (last %ld) lost %lld repins %ld\n",
	       c.nmi_ok, c.nmi_err, c.nmi_last_err, lost, c.repins);
	for (i = 0; i < nw; i++)
		printf("worker %d (CPU %d): %lu steps\n", i, w[i].cpu, w[i].iters);
	ls_print_stats("nmi", nmi);
	ls_print_stats("perf", perf);
	ls_print_stats("tp_btf", sys);

	/* Totals over every toggled CPU: the walk need not pick each one */
	ASSERT_GT(h.total_cycles, 0, "a CPU went offline and back online");
	/* max_off >= 2: 4 CPUs or more in the test, CPU 0 and 3 that can go offline */
	if (h.max_off >= 2)
		ASSERT_GT(h.multi, 0, "two CPUs or more offline at the same time");
	for (i = 0; i < nw; i++)
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
	ls_workers_stop(w, ARRAY_SIZE(w), &stop);
	cpus_up(&h, "at the end");
	bpf_link__destroy(sys_link);
	bpf_link__destroy(nmi_link);
	for (i = 0; i < ARRAY_SIZE(h.links); i++)
		bpf_link__destroy(h.links[i]);
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
