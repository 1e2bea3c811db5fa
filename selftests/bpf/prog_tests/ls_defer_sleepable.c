// SPDX-License-Identifier: GPL-2.0
/*
 * A sleepable program that holds a local storage value keeps it, and its
 * kptr, until it is done, even when the element is deleted meanwhile.
 *
 * Sleepable programs run under rcu_read_lock_trace(), not rcu_read_lock(),
 * and may sleep holding a pointer to a value. So a deleted element may be
 * freed only after a Tasks Trace RCU grace period, and its special fields
 * freed (bpf_obj_free_fields()) only then too. An element freed after a
 * regular RCU grace period is a use-after-free for such a program.
 *
 * A SEC("syscall") program (sleepable) gets its task's (or its cgroup's)
 * value, stores a lsdefer_obj kptr and a canary in it, then blocks in
 * bpf_copy_from_user() on a userfaultfd page. Meanwhile user space deletes
 * the element with a syscall, lets several regular RCU grace periods pass and
 * reuses the memory of its slab cache with same-size values. The checks:
 * - while the program sleeps, the object's destructor does not run (a
 *   regular RCU grace period would have freed it by then);
 * - when the program wakes up, the canary is intact and the object is still
 *   in the value; it swaps in a new object, which must be destroyed when the
 *   value is finally freed, after the program returned;
 * - every object is destroyed exactly once (and no KASAN report: the harness
 *   checks dmesg).
 */
#define _GNU_SOURCE
#include <test_progs.h>
#include <poll.h>
#include <sys/mman.h>
#include <linux/userfaultfd.h>
#include "cgroup_helpers.h"
#include "ls_defer_helpers.h"
#include "ls_defer_sleepable.skel.h"

#define CG_PATH			"/ls_defer_sleepable"
#define NR_CHURN_MAPS		8
#define CHURN_THREADS_PER_CPU	4
#define MAX_CPUS		32
/* how long the destructor must not run while the program sleeps */
#define HOLD_MS			600

struct reader {
	struct ls_defer_sleepable *skel;
	bool cgrp;
	int tid;
	int err;
	__u32 retval;
};

static void *reader_main(void *arg)
{
	LIBBPF_OPTS(bpf_test_run_opts, opts);
	struct reader *r = arg;
	struct bpf_program *prog;

	ls_store(&r->tid, sys_gettid());
	prog = r->cgrp ? r->skel->progs.read_cgrp : r->skel->progs.read_task;
	r->err = bpf_prog_test_run_opts(bpf_program__fd(prog), &opts);
	r->retval = opts.retval;
	return NULL;
}

struct churn {
	int fds[NR_CHURN_MAPS];
	int cpu;
	int created;
	int err;
};

/* Same-size values in every churn map: reuses what a too early free released */
static void *churn_main(void *arg)
{
	struct ls_defer_uval v = { .canary = LS_DEFER_CHURN };
	struct churn *c = arg;
	int i, pidfd;

	memset(v.pad, 0x5a, sizeof(v.pad));
	ls_pin_cpu(c->cpu);
	pidfd = ls_self_pidfd();
	if (pidfd < 0) {
		c->err = -errno;
		return NULL;
	}
	for (i = 0; i < NR_CHURN_MAPS; i++) {
		if (bpf_map_update_elem(c->fds[i], &pidfd, &v, BPF_NOEXIST))
			c->err = -errno;
		else
			c->created++;
	}
	close(pidfd);
	return NULL;
}

static int churn(struct ls_defer_sleepable *skel)
{
	struct churn c[MAX_CPUS * CHURN_THREADS_PER_CPU] = {};
	pthread_t th[MAX_CPUS * CHURN_THREADS_PER_CPU];
	struct bpf_map *maps[NR_CHURN_MAPS] = {
		skel->maps.churn_0, skel->maps.churn_1, skel->maps.churn_2,
		skel->maps.churn_3, skel->maps.churn_4, skel->maps.churn_5,
		skel->maps.churn_6, skel->maps.churn_7,
	};
	int nr_cpus = ls_nr_cpus(), n, i, j, created = 0, err = 0;

	if (nr_cpus > MAX_CPUS)
		nr_cpus = MAX_CPUS;
	n = nr_cpus * CHURN_THREADS_PER_CPU;
	for (i = 0; i < n; i++) {
		for (j = 0; j < NR_CHURN_MAPS; j++)
			c[i].fds[j] = bpf_map__fd(maps[j]);
		c[i].cpu = i % nr_cpus;
		if (pthread_create(&th[i], NULL, churn_main, &c[i])) {
			n = i;
			break;
		}
	}
	for (i = 0; i < n; i++) {
		pthread_join(th[i], NULL);
		created += c[i].created;
		if (!err)
			err = c[i].err;
	}
	return err ?: created;
}

/* True if the destructor count stays at dtor0 for ms milliseconds */
static bool dtor_stays(long long dtor0, int ms)
{
	__u64 deadline = get_time_ns() + (__u64)ms * 1000000;

	do {
		kern_sync_rcu();
		if (lsdefer_cnt(LSDEFER_CNT_DTOR) != dtor0)
			return false;
		usleep(10000);
	} while (get_time_ns() < deadline);
	return lsdefer_cnt(LSDEFER_CNT_DTOR) == dtor0;
}

/* Waits up to ms for the destructor count to reach want */
static bool dtor_reaches(long long want, int ms)
{
	__u64 deadline = get_time_ns() + (__u64)ms * 1000000;

	while (lsdefer_cnt(LSDEFER_CNT_DTOR) < want) {
		if (get_time_ns() > deadline)
			return false;
		kern_sync_rcu();
		usleep(10000);
	}
	return true;
}

static void run_case(bool cgrp, int cgroup_fd, __u64 cgid)
{
	struct pollfd pfd = { .events = POLLIN };
	struct reader r = { .cgrp = cgrp };
	struct uffdio_copy uffd_copy = {};
	void *fault_page = MAP_FAILED, *src_page = MAP_FAILED;
	long page_size = getpagesize();
	struct ls_defer_sleepable *skel = NULL;
	struct ls_defer_uval v;
	struct uffd_msg msg;
	struct ls_leak_ck ck;
	long long dtor0;
	int uffd = -1, pidfd = -1, map_fd, key, err, i;
	bool started = false;
	pthread_t thread;

	if (!ls_leak_begin(&ck))
		return;
	dtor0 = ck.s.v[LSDEFER_CNT_DTOR];
	fault_page = mmap(NULL, page_size, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!ASSERT_NEQ(fault_page, MAP_FAILED, "mmap fault_page"))
		goto out;
	src_page = mmap(NULL, page_size, PROT_READ | PROT_WRITE,
			MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!ASSERT_NEQ(src_page, MAP_FAILED, "mmap src_page"))
		goto out;

	skel = ls_defer_sleepable__open_and_load();
	if (!ASSERT_OK_PTR(skel, "ls_defer_sleepable__open_and_load"))
		goto out;
	skel->bss->fault_addr = fault_page;
	skel->bss->cgid = cgid;
	r.skel = skel;

	uffd = uffd_block_page(fault_page);
	if (!ASSERT_OK_FD(uffd, "userfaultfd open + register page"))
		goto out;
	if (!ASSERT_OK(pthread_create(&thread, NULL, reader_main, &r), "pthread_create"))
		goto out;
	started = true;

	/* Wait for the program to sleep in bpf_copy_from_user(), value in hand */
	pfd.fd = uffd;
	if (!ASSERT_EQ(poll(&pfd, 1, 30000), 1, "poll uffd"))
		goto out;
	if (!ASSERT_EQ(read(uffd, &msg, sizeof(msg)), sizeof(msg), "read uffd") ||
	    !ASSERT_EQ(msg.event, UFFD_EVENT_PAGEFAULT, "uffd pagefault") ||
	    !ASSERT_EQ(skel->bss->stage, 1, "program holds the value") ||
	    !ASSERT_EQ(skel->bss->err, 0, "program error"))
		goto out;

	if (cgrp) {
		map_fd = bpf_map__fd(skel->maps.cgrp_map);
		key = cgroup_fd;
	} else {
		map_fd = bpf_map__fd(skel->maps.task_map);
		pidfd = sys_pidfd_open(ls_load(&r.tid), PIDFD_THREAD);
		if (!ASSERT_OK_FD(pidfd, "pidfd_open reader"))
			goto out;
		key = pidfd;
	}
	if (!ASSERT_OK(bpf_map_lookup_elem(map_fd, &key, &v), "lookup held value") ||
	    !ASSERT_EQ(v.canary, LS_DEFER_CANARY, "held value canary"))
		goto out;
	if (!ASSERT_OK(bpf_map_delete_elem(map_fd, &key), "delete the held element"))
		goto out;
	err = bpf_map_lookup_elem(map_fd, &key, &v);
	ASSERT_EQ(err ? -errno : 0, -ENOENT, "element gone for syscalls");

	/*
	 * Several regular RCU grace periods and then some: an element freed
	 * after one would be freed, its destructor run, by now. Then reuse its
	 * slab cache with same-size values.
	 */
	for (i = 0; i < 3; i++)
		kern_sync_rcu();
	ASSERT_TRUE(dtor_stays(dtor0, HOLD_MS / 2),
		    "kptr destructor waits for the sleeping program");
	err = churn(skel);
	ASSERT_GT(err, 0, "churn values created");
	ASSERT_TRUE(dtor_stays(dtor0, HOLD_MS / 2),
		    "kptr destructor waits for the sleeping program (after churn)");

out:
	/* Wake the program up */
	if (uffd >= 0) {
		memset(src_page, 0, page_size);
		uffd_copy.dst = (unsigned long)fault_page;
		uffd_copy.src = (unsigned long)src_page;
		uffd_copy.len = page_size;
		ASSERT_OK(ioctl(uffd, UFFDIO_COPY, &uffd_copy), "uffd copy");
		close(uffd);
	}
	if (started && ASSERT_OK(pthread_join(thread, NULL), "pthread_join")) {
		ASSERT_OK(r.err, "test_run");
		ASSERT_EQ(skel->bss->stage, 2, "program woke up");
		ASSERT_EQ(skel->bss->canary_after, LS_DEFER_CANARY,
			  "canary intact after the sleep");
		ASSERT_EQ(skel->bss->dtor_at_resume, dtor0,
			  "no destructor ran while the program slept");
		ASSERT_EQ(skel->bss->old_missing, 0,
			  "object still in the deleted value after the sleep");
		ASSERT_EQ(skel->bss->old_id, skel->bss->obj_id,
			  "same object in the value after the sleep");
		ASSERT_EQ(skel->bss->new_obj_fail, 0, "new object");
		/* The new object goes with the value, once the program is done */
		if (ASSERT_TRUE(dtor_reaches(dtor0 + 1, 30000),
				"deleted value freed after the program returned"))
			ASSERT_GT((__u64)lsdefer_cnt(LSDEFER_CNT_LAST_DTOR_SEQ),
				  skel->bss->seq_resume,
				  "destructor ran after the program woke up");
	}
	if (pidfd >= 0)
		close(pidfd);
	if (skel) {
		ls_defer_sleepable__destroy(skel);
		ls_leak_end(&ck);
	}
	if (src_page != MAP_FAILED)
		munmap(src_page, page_size);
	if (fault_page != MAP_FAILED)
		munmap(fault_page, page_size);
}

void serial_test_ls_defer_sleepable(void)
{
	int cgroup_fd;
	__u64 cgid;

	if (!lsdefer_ready())
		return;
	cgroup_fd = test__join_cgroup(CG_PATH);
	if (!ASSERT_OK_FD(cgroup_fd, "join cgroup"))
		return;
	cgid = get_cgroup_id(CG_PATH);
	if (ASSERT_NEQ(cgid, 0, "cgroup id")) {
		if (test__start_subtest("task"))
			run_case(false, cgroup_fd, cgid);
		if (test__start_subtest("cgrp"))
			run_case(true, cgroup_fd, cgid);
	}
	close(cgroup_fd);
}
