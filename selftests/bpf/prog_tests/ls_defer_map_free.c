// SPDX-License-Identifier: GPL-2.0
/*
 * Free a local storage map while the elements just deleted from it still wait
 * for their grace period.
 *
 * Freeing a deleted element reads its map's btf_record (bpf_obj_free_fields()
 * for the kptr in the value). rcu_barrier_tasks_trace() in map free does not
 * wait for elements that sit in the deferred-free engine's per-CPU lists, nor
 * for a grace period chained by a callback: map free must wait for the engine, or
 * those elements are freed after the map, through a freed btf_record.
 *
 * Each round, user space creates task and cgroup storage maps and puts them
 * in map-in-map slots; worker threads on every CPU trigger a tp_btf program
 * that creates their values (each with a lsdefer_obj kptr) in every map.
 * Then the program deletes half of the elements while user space deletes the
 * other half with syscalls, and right away user space drops the maps: out of
 * the slots, fds closed, so each map is freed a regular RCU grace period
 * later. When the maps are freed (lsdefer_testmod's reference count, held
 * through each map's btf_record, is back), every object created must have
 * been destroyed, and the engine must have freed everything queued. A map
 * free that does not flush fails here, or with a KASAN report in dmesg when
 * the late frees touch the freed map.
 *
 * Every other round has a single task storage map, whose values the program
 * deletes: once that map is freed, no object of the round may be left (with
 * several maps, freed one at a time, objects of the others legitimately are).
 * A sleepable program (reader A) sleeps in a Tasks Trace RCU read-side
 * critical section from before the first delete until after the map is
 * dropped: no grace period can end, so every deleted element is still queued
 * when map free runs. Then readers hand over: each
 * new reader enters before the previous one leaves, so that the grace period
 * in flight can end and the next one cannot. The first grace period's
 * callbacks re-arm the chain for the elements that arrived meanwhile; a map
 * free that only waits for callbacks already queued
 * (rcu_barrier_tasks_trace()) returns while those still wait, one or two
 * grace periods behind (two engines, selems and storages, start their chains
 * at different times, and the barrier waits for the later one). After each
 * handover, if the maps are gone, the check runs right then, while the
 * current reader holds the rest back. A map free that waits has freed
 * everything by the time it returns.
 *
 * Those rounds run on CPU 0 alone (workers, syscalls, and the creates, whose
 * losing racers free a value): the engine chains grace periods per CPU, and
 * fewer chains started at different times mean fewer handovers needed.
 */
#define _GNU_SOURCE
#include <test_progs.h>
#include <poll.h>
#include <sys/mman.h>
#include <linux/userfaultfd.h>
#include "cgroup_helpers.h"
#include "ls_defer_helpers.h"
#include "ls_defer_map_free.skel.h"

#define CG_PATH		"/ls_defer_map_free"
#define ROUNDS		20
#define NR_WORKERS	8
#define NR_SLOTS	4	/* as in progs/ls_defer_map_free.c */
#define PROG_SLOTS	2
/* how long A holds the grace period in flight after the maps are dropped */
#define A_HOLD_MS	1000
/* readers after A; each holds the next grace period back for up to HOLD_MS */
#define NR_HANDOVERS	3
/* SRCU polls its readers lazily: give a grace period time to end */
#define HOLD_MS		2000
#define MODE_OFF	0
#define MODE_CREATE	1
#define MODE_DELETE	2

struct round_sync {
	pthread_barrier_t start;
	pthread_barrier_t done;
	int ready;	/* the barriers are set up */
	int quit;
	int one_cpu;	/* >= 0: every worker runs there, else on cpu[] */
	int pidfd[NR_WORKERS];
	int cpu[NR_WORKERS];
	int err;
};

struct worker_arg {
	struct round_sync *rs;
	int idx;
};

/* One getppid() per step; the tp_btf program does the rest */
static void *worker_main(void *arg)
{
	struct worker_arg *a = arg;
	struct round_sync *rs = a->rs;
	int on = -1, want;

	ls_pin_cpu(rs->cpu[a->idx]);
	rs->pidfd[a->idx] = ls_self_pidfd();
	if (rs->pidfd[a->idx] < 0)
		rs->err = -errno;
	while (!ls_load(&rs->ready))
		usleep(1000);
	if (ls_load(&rs->quit))
		return NULL;
	for (;;) {
		pthread_barrier_wait(&rs->start);
		if (ls_load(&rs->quit))
			break;
		want = ls_load(&rs->one_cpu);
		if (want != on) {
			ls_pin_cpu(want >= 0 ? want : rs->cpu[a->idx]);
			on = want;
		}
		syscall(SYS_getppid);
		pthread_barrier_wait(&rs->done);
	}
	return NULL;
}

/* Values present in the first nr slots: each worker's task value, the cgroup's */
static int count_values(int *task_fds, int *cgrp_fds, struct round_sync *rs, int cgroup_fd,
			int nr)
{
	struct ls_defer_uval v;
	int s, i, n = 0;

	for (s = 0; s < nr; s++) {
		for (i = 0; i < NR_WORKERS; i++)
			n += !bpf_map_lookup_elem(task_fds[s], &rs->pidfd[i], &v);
		n += !bpf_map_lookup_elem(cgrp_fds[s], &cgroup_fd, &v);
	}
	return n;
}

static void step(struct round_sync *rs)
{
	pthread_barrier_wait(&rs->start);
	pthread_barrier_wait(&rs->done);
}

/* Task storage maps in the first nr slots, and cgroup storage maps if cgrp */
static int create_maps(struct ls_defer_map_free *skel, int *task_fds, int *cgrp_fds, int nr,
		       bool cgrp)
{
	LIBBPF_OPTS(bpf_map_create_opts, opts);
	int outer_task = bpf_map__fd(skel->maps.outer_task);
	int outer_cgrp = bpf_map__fd(skel->maps.outer_cgrp);
	int i;

	opts.btf_fd = bpf_object__btf_fd(skel->obj);
	opts.btf_key_type_id = bpf_map__btf_key_type_id(skel->maps.inner_task);
	opts.btf_value_type_id = bpf_map__btf_value_type_id(skel->maps.inner_task);
	opts.map_flags = BPF_F_NO_PREALLOC;
	for (i = 0; i < nr; i++) {
		task_fds[i] = bpf_map_create(BPF_MAP_TYPE_TASK_STORAGE, "ls_round_task",
					     sizeof(int), sizeof(struct ls_defer_uval), 0,
					     &opts);
		if (task_fds[i] < 0 ||
		    bpf_map_update_elem(outer_task, &i, &task_fds[i], BPF_ANY))
			return -errno;
		if (!cgrp)
			continue;
		cgrp_fds[i] = bpf_map_create(BPF_MAP_TYPE_CGRP_STORAGE, "ls_round_cgrp",
					     sizeof(int), sizeof(struct ls_defer_uval), 0,
					     &opts);
		if (cgrp_fds[i] < 0 ||
		    bpf_map_update_elem(outer_cgrp, &i, &cgrp_fds[i], BPF_ANY))
			return -errno;
	}
	return 0;
}

/* Out of the slots, fds closed: nothing holds the maps any more */
static void drop_maps(struct ls_defer_map_free *skel, int *task_fds, int *cgrp_fds)
{
	int outer_task = bpf_map__fd(skel->maps.outer_task);
	int outer_cgrp = bpf_map__fd(skel->maps.outer_cgrp);
	int i;

	for (i = 0; i < NR_SLOTS; i++) {
		bpf_map_delete_elem(outer_task, &i);
		bpf_map_delete_elem(outer_cgrp, &i);
		if (task_fds[i] >= 0)
			close(task_fds[i]);
		if (cgrp_fds[i] >= 0)
			close(cgrp_fds[i]);
		task_fds[i] = -1;
		cgrp_fds[i] = -1;
	}
}

/* A sleepable program that holds Tasks Trace RCU until release_reader() */
struct reader {
	struct ls_defer_map_free *skel;
	pthread_t thread;
	void *page;
	int uffd;
	int err;
	bool started;
};

static void *reader_main(void *arg)
{
	LIBBPF_OPTS(bpf_test_run_opts, opts);
	struct reader *r = arg;

	r->err = bpf_prog_test_run_opts(bpf_program__fd(r->skel->progs.hold), &opts);
	return NULL;
}

static bool hold_reader(struct reader *r, struct ls_defer_map_free *skel)
{
	struct pollfd pfd = { .events = POLLIN };
	struct uffd_msg msg;

	memset(r, 0, sizeof(*r));
	r->skel = skel;
	r->uffd = -1;
	r->page = mmap(NULL, getpagesize(), PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!ASSERT_NEQ(r->page, MAP_FAILED, "mmap"))
		return false;
	r->uffd = uffd_block_page(r->page);
	if (!ASSERT_OK_FD(r->uffd, "userfaultfd"))
		return false;
	skel->bss->fault_addr = r->page;
	if (!ASSERT_OK(pthread_create(&r->thread, NULL, reader_main, r), "pthread_create"))
		return false;
	r->started = true;
	pfd.fd = r->uffd;
	return ASSERT_EQ(poll(&pfd, 1, 30000), 1, "reader asleep") &&
	       ASSERT_EQ(read(r->uffd, &msg, sizeof(msg)), sizeof(msg), "read uffd") &&
	       ASSERT_EQ(msg.event, UFFD_EVENT_PAGEFAULT, "uffd pagefault");
}

static void release_reader(struct reader *r)
{
	struct uffdio_copy copy = {};
	char *src;

	if (r->uffd >= 0) {
		src = calloc(1, getpagesize());
		copy.dst = (unsigned long)r->page;
		copy.src = (unsigned long)src;
		copy.len = getpagesize();
		ASSERT_OK(src ? ioctl(r->uffd, UFFDIO_COPY, &copy) : -ENOMEM, "uffd copy");
		free(src);
		close(r->uffd);
		r->uffd = -1;
	}
	if (r->started) {
		pthread_join(r->thread, NULL);
		ASSERT_OK(r->err, "reader test_run");
		r->started = false;
	}
	if (r->page && r->page != MAP_FAILED)
		munmap(r->page, getpagesize());
	r->page = NULL;
}

/* Where a round stands: maps not yet freed, elements still in the engine */
static void note(int round, const char *when, int refcnt)
{
	struct ls_engine e;

	if (ls_engine_read(&e))
		return;
	printf("round %d, %s: maps alive %d, engine waiting: selem %lld storage %lld\n",
	       round, when, lsdefer_refcnt() - refcnt, e.selem_queued - e.selem_freed,
	       e.storage_queued - e.storage_freed);
}

void serial_test_ls_defer_map_free(void)
{
	int task_fds[NR_SLOTS], cgrp_fds[NR_SLOTS];
	struct worker_arg args[NR_WORKERS];
	struct ls_defer_map_free *skel = NULL;
	int nr_cpus, cgroup_fd, refcnt, round, i, s, nth = 0, pending_rounds = 0;
	int waited_rounds = 0, freed_held = 0, k;
	__u64 exp_task_del = 0, exp_cgrp_del = 0;
	struct reader rd[NR_HANDOVERS + 1] = {};
	pthread_t th[NR_WORKERS];
	struct ls_defer_stats *cst, *dst;
	struct round_sync rs = {};
	struct ls_leak_ck ck;
	bool barriers = false;
	struct ls_engine e;

	for (i = 0; i < NR_SLOTS; i++) {
		task_fds[i] = -1;
		cgrp_fds[i] = -1;
	}
	for (k = 0; k <= NR_HANDOVERS; k++)
		rd[k].uffd = -1;
	if (!lsdefer_ready())
		return;
	cgroup_fd = test__join_cgroup(CG_PATH);
	if (!ASSERT_OK_FD(cgroup_fd, "join cgroup"))
		return;
	if (!ls_leak_begin(&ck))
		goto out;
	skel = ls_defer_map_free__open_and_load();
	if (!ASSERT_OK_PTR(skel, "ls_defer_map_free__open_and_load"))
		goto out;
	cst = &skel->bss->create_st;
	dst = &skel->bss->delete_st;
	skel->bss->target_tgid = getpid();
	skel->data->trigger_nr = SYS_getppid;
	if (!ASSERT_OK(ls_defer_map_free__attach(skel), "attach"))
		goto out;
	/* What the templates, the outer maps and the program hold */
	refcnt = lsdefer_refcnt();

	nr_cpus = ls_nr_cpus();
	rs.one_cpu = -1;
	for (i = 0; i < NR_WORKERS; i++) {
		rs.cpu[i] = i % nr_cpus;
		rs.pidfd[i] = -1;
		args[i].rs = &rs;
		args[i].idx = i;
		if (!ASSERT_OK(pthread_create(&th[i], NULL, worker_main, &args[i]),
			       "pthread_create"))
			break;
		nth++;
	}
	if (nth < NR_WORKERS ||
	    !ASSERT_OK(pthread_barrier_init(&rs.start, NULL, NR_WORKERS + 1), "barrier") ||
	    !ASSERT_OK(pthread_barrier_init(&rs.done, NULL, NR_WORKERS + 1), "barrier")) {
		ls_store(&rs.quit, 1);
		ls_store(&rs.ready, 1);
		goto out;
	}
	barriers = true;
	ls_store(&rs.ready, 1);

	for (round = 0; round < ROUNDS; round++) {
		/* hold rounds: one task storage map, deleted from by the program */
		bool hold = !(round & 1);
		int nr = hold ? 1 : NR_SLOTS, nr_prog = nr < PROG_SLOTS ? nr : PROG_SLOTS;
		int want = nr * NR_WORKERS + (hold ? 0 : nr);

		if (hold) {
			ls_store(&rs.one_cpu, 0);
			if (!ASSERT_OK(ls_pin_cpu(0), "pin to CPU 0") || !hold_reader(&rd[0], skel))
				goto out;
		}
		if (!ASSERT_OK(create_maps(skel, task_fds, cgrp_fds, nr, !hold),
			       "create the round's maps"))
			goto out;

		/*
		 * A tp_btf program preempted on a CPU makes the next task that
		 * enters it there miss it (per-CPU recursion check): step again
		 * until every value is there.
		 */
		skel->bss->mode = MODE_CREATE;
		for (i = 0; i < 100 && count_values(task_fds, cgrp_fds, &rs, cgroup_fd, nr) < want;
		     i++)
			step(&rs);
		if (!ASSERT_OK(rs.err, "worker pidfd") ||
		    !ASSERT_EQ(count_values(task_fds, cgrp_fds, &rs, cgroup_fd, nr), want,
			       "values created"))
			goto out;

		/* The program deletes half, syscalls the other half, at the same time */
		skel->bss->mode = MODE_DELETE;
		pthread_barrier_wait(&rs.start);
		for (s = PROG_SLOTS; s < nr; s++) {
			for (i = 0; i < NR_WORKERS; i++)
				ASSERT_OK(bpf_map_delete_elem(task_fds[s], &rs.pidfd[i]),
					  "syscall delete task storage");
			ASSERT_OK(bpf_map_delete_elem(cgrp_fds[s], &cgroup_fd),
				  "syscall delete cgroup storage");
		}
		pthread_barrier_wait(&rs.done);
		for (i = 0; i < 100 && count_values(task_fds, cgrp_fds, &rs, cgroup_fd, nr_prog);
		     i++)
			step(&rs);
		exp_task_del += NR_WORKERS * nr_prog;
		exp_cgrp_del += hold ? 0 : nr_prog;
		skel->bss->mode = MODE_OFF;
		if (!ASSERT_EQ(count_values(task_fds, cgrp_fds, &rs, cgroup_fd, NR_SLOTS), 0,
			       "values deleted"))
			goto out;

		/* and free the maps right away */
		drop_maps(skel, task_fds, cgrp_fds);
		if (!ls_engine_read(&e) && e.selem_queued != e.selem_freed)
			pending_rounds++;
		if (hold) {
			/*
			 * Map free starts and waits for A: it must be waiting
			 * before A leaves, or it waits for what A's grace
			 * period's callbacks re-arm.
			 */
			note(round, "maps dropped", refcnt);
			usleep(A_HOLD_MS * 1000);
			if (lsdefer_refcnt() > refcnt)
				waited_rounds++;
			for (k = 1; k <= NR_HANDOVERS; k++) {
				if (!hold_reader(&rd[k], skel))
					goto out;
				release_reader(&rd[k - 1]);
				if (ls_poll_refcnt(refcnt, HOLD_MS) != refcnt) {
					note(round, "handover, maps alive", refcnt);
					continue;
				}
				/* the maps are gone while reader k holds a grace period back */
				note(round, "handover, maps freed", refcnt);
				freed_held++;
				if (ls_check_freed(&ck, "objects destroyed at map free (held)"))
					break;
				printf("%s: round %d: map free returned before reader %d left\n",
				       __func__, round, k);
				goto out;
			}
			for (k = 0; k <= NR_HANDOVERS; k++)
				release_reader(&rd[k]);
			ls_store(&rs.one_cpu, -1);
			ls_unpin();
		}

		if (!ASSERT_TRUE(ls_wait_refcnt(refcnt, ls_map_free_stuck ? 2000 : 30000),
				 "the round's maps freed")) {
			ls_map_free_stuck = true;
			goto out;
		}
		if (!ls_check_freed(&ck, "every object destroyed by the time its map is freed") ||
		    !ls_check_storages_freed(&ck)) {
			printf("%s: round %d\n", __func__, round);
			goto out;
		}
	}
	printf("%s: %d of %d rounds dropped their maps with deletes still queued\n",
	       __func__, pending_rounds, ROUNDS);
	printf("%s: %d of %d rounds' map frees waited for the sleeping reader\n",
	       __func__, waited_rounds, (ROUNDS + 1) / 2);
	printf("%s: %d of %d rounds' maps were freed while a reader held a grace period\n",
	       __func__, freed_held, (ROUNDS + 1) / 2);
	/*
	 * The condition the held rounds exist for: map free ran while the
	 * chain was held back, and returned while a reader still held a later
	 * grace period. Without it a broken flush (BROKEN=3) passes by luck.
	 */
	ASSERT_GT(waited_rounds, 0, "map frees that waited for the sleeping reader");
	ASSERT_GT(freed_held, 0, "maps freed while a reader held a grace period");
	ls_print_stats("create", cst);
	ls_print_stats("delete", dst);
	/* each worker's values: deleted once each, by its program (retried if busy) */
	ASSERT_EQ(dst->task_del[LS_RC_OK], exp_task_del, "program task storage deletes");
	/* the workers share the cgroup value: racing deletes may all return 0 */
	ASSERT_GE(dst->cgrp_del[LS_RC_OK] + dst->cgrp_del[LS_RC_BUSY],
		  exp_cgrp_del, "program cgroup storage deletes");
	ASSERT_EQ(dst->task_del[LS_RC_OTHER] + dst->cgrp_del[LS_RC_OTHER], 0,
		  "program delete: unexpected error");
	ASSERT_EQ(cst->obj_fail, 0, "program object failures");
out:
	for (k = 0; k <= NR_HANDOVERS; k++)
		release_reader(&rd[k]);
	ls_unpin();
	if (skel)
		skel->bss->mode = MODE_OFF;
	if (nth) {
		ls_store(&rs.quit, 1);
		/* the workers wait at start (or never got to the barriers) */
		if (barriers)
			pthread_barrier_wait(&rs.start);
		for (i = 0; i < nth; i++)
			pthread_join(th[i], NULL);
		for (i = 0; i < nth; i++)
			if (rs.pidfd[i] >= 0)
				close(rs.pidfd[i]);
	}
	if (barriers) {
		pthread_barrier_destroy(&rs.start);
		pthread_barrier_destroy(&rs.done);
	}
	if (skel) {
		drop_maps(skel, task_fds, cgrp_fds);
		ls_defer_map_free__destroy(skel);
		ls_leak_end(&ck);
	}
	close(cgroup_fd);
}
