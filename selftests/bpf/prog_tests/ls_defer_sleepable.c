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
 *   checks dmesg);
 * - another map's free while the program sleeps does not free the held
 *   element either: it was deleted, on one CPU, right after an element whose
 *   grace period the program holds in flight, so it waits in that CPU's
 *   pending list, and map free waits for its own map's elements only (an
 *   engine whose map free took other maps' elements and freed them without
 *   a grace period fails here).
 *
 * delete_storm_held: a batch of 10^5 objects is freed in bounded steps, not
 * in one callback. Pinned to one CPU, with such a program asleep (holding the
 * Tasks Trace grace period for 2 s at least), a SEC("syscall") program
 * creates and deletes its task's storage element STORM_N times (bpf_loop), so
 * STORM_N elements, and as many storages, pile up in that CPU's pending lists
 * behind one grace period. The RCU callback runs with bottom halves disabled:
 * freeing the whole batch there would keep them off for as long as 10^5
 * frees take (stock 7.3 frees one object per callback). The checks, from the
 * engine's stats file:
 * - while the program sleeps, none of the deleted elements is freed (that
 *   CPU's selem queued - freed >= the deletes);
 * - once it wakes up, that CPU's selems and storages are all freed (queued ==
 *   freed) within STORM_WAIT_MS, by the chain alone: the maps are still open,
 *   nothing flushes;
 * - no step freed more than FREE_CHUNK (64) objects (max_step of the total
 *   lines), and the batch went on in the free work (that CPU's selem offloads
 *   grew);
 * - the deletes rode a few grace periods, not one each (that CPU's selem gps
 *   grew by STORM_MAX_GPS at most).
 * It prints the longest step (objects, ns) and how long after the wake-up
 * everything was freed. An engine that frees whole batches in the callback
 * (selftests/broken, BROKEN=kb) fails: max_step is the whole batch, offloads
 * stay at 0.
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

/* delete_storm_held */
#define STORM_CPU		0
#define STORM_N			100000	/* create + delete pairs */
#define STORM_RUNS		10	/* runs of STORM_N / STORM_RUNS: short syscalls */
#define STORM_HOLD_MS		2000	/* the program sleeps this long at least */
#define STORM_WAIT_MS		60000	/* for everything to be freed after */
#define STORM_MAX_GPS		4
/* rust/bpf/bpf_local_storage_defer.rs: most objects freed in one step */
#define FREE_CHUNK		64

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

/* A reader asleep in bpf_copy_from_user() on a userfaultfd page */
struct hold {
	struct reader r;
	pthread_t thread;
	void *fault_page;
	void *src_page;
	int uffd;
	bool started;
};

static void hold_init(struct hold *h)
{
	memset(h, 0, sizeof(*h));
	h->fault_page = MAP_FAILED;
	h->src_page = MAP_FAILED;
	h->uffd = -1;
}

/*
 * Starts the reader (read_cgrp if cgrp, else read_task) and waits until it
 * sleeps, value in hand. Whatever happens, hold_release() wakes it up.
 */
static bool hold_start(struct hold *h, struct ls_defer_sleepable *skel, bool cgrp)
{
	struct pollfd pfd = { .events = POLLIN };
	long page_size = getpagesize();
	struct uffd_msg msg;

	h->r.skel = skel;
	h->r.cgrp = cgrp;
	h->fault_page = mmap(NULL, page_size, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!ASSERT_NEQ(h->fault_page, MAP_FAILED, "mmap fault_page"))
		return false;
	h->src_page = mmap(NULL, page_size, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!ASSERT_NEQ(h->src_page, MAP_FAILED, "mmap src_page"))
		return false;
	skel->bss->fault_addr = h->fault_page;

	h->uffd = uffd_block_page(h->fault_page);
	if (!ASSERT_OK_FD(h->uffd, "userfaultfd open + register page"))
		return false;
	if (!ASSERT_OK(pthread_create(&h->thread, NULL, reader_main, &h->r),
		       "pthread_create"))
		return false;
	h->started = true;

	/* Wait for the program to sleep in bpf_copy_from_user(), value in hand */
	pfd.fd = h->uffd;
	return ASSERT_EQ(poll(&pfd, 1, 30000), 1, "poll uffd") &&
	       ASSERT_EQ(read(h->uffd, &msg, sizeof(msg)), sizeof(msg), "read uffd") &&
	       ASSERT_EQ(msg.event, UFFD_EVENT_PAGEFAULT, "uffd pagefault") &&
	       ASSERT_EQ(skel->bss->stage, 1, "program holds the value") &&
	       ASSERT_EQ(skel->bss->err, 0, "program error");
}

/*
 * Wakes the program up (closing the userfaultfd wakes it too, should the
 * copy fail) and joins its thread; true if it was started and joined.
 * Idempotent.
 */
static bool hold_release(struct hold *h)
{
	struct uffdio_copy uffd_copy = {};
	long page_size = getpagesize();
	bool joined = false;

	if (h->uffd >= 0) {
		memset(h->src_page, 0, page_size);
		uffd_copy.dst = (unsigned long)h->fault_page;
		uffd_copy.src = (unsigned long)h->src_page;
		uffd_copy.len = page_size;
		ASSERT_OK(ioctl(h->uffd, UFFDIO_COPY, &uffd_copy), "uffd copy");
		close(h->uffd);
		h->uffd = -1;
	}
	if (h->started) {
		joined = ASSERT_OK(pthread_join(h->thread, NULL), "pthread_join");
		h->started = false;
	}
	return joined;
}

/* After hold_release(), once the program is no more */
static void hold_unmap(struct hold *h)
{
	long page_size = getpagesize();

	if (h->src_page != MAP_FAILED)
		munmap(h->src_page, page_size);
	if (h->fault_page != MAP_FAILED)
		munmap(h->fault_page, page_size);
	h->src_page = MAP_FAILED;
	h->fault_page = MAP_FAILED;
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

/*
 * Creates a task storage map that no program uses (its free does not wait for
 * a Tasks Trace grace period first), gives it an element of ours, deletes it
 * and closes the map: its free runs at once and waits for that element.
 */
static int free_other_map(struct ls_defer_sleepable *skel)
{
	LIBBPF_OPTS(bpf_map_create_opts, opts, .map_flags = BPF_F_NO_PREALLOC);
	const struct bpf_map *like = skel->maps.storm_map;
	int fd, pidfd, err;
	__u64 val = 1;

	opts.btf_fd = bpf_object__btf_fd(skel->obj);
	opts.btf_key_type_id = bpf_map__btf_key_type_id(like);
	opts.btf_value_type_id = bpf_map__btf_value_type_id(like);
	fd = bpf_map_create(BPF_MAP_TYPE_TASK_STORAGE, "ls_other", sizeof(int),
			    sizeof(val), 0, &opts);
	if (fd < 0)
		return -errno;
	pidfd = ls_self_pidfd();
	if (pidfd < 0) {
		err = -errno;
		close(fd);
		return err;
	}
	err = bpf_map_update_elem(fd, &pidfd, &val, BPF_NOEXIST);
	err = err ?: bpf_map_delete_elem(fd, &pidfd);
	err = err ? -errno : 0;
	close(pidfd);
	close(fd);
	return err;
}

/* Creates and deletes an element of our own in storm_map */
static int prime_chain(struct ls_defer_sleepable *skel)
{
	int fd = bpf_map__fd(skel->maps.storm_map), pidfd, err;
	__u64 val = 1;

	pidfd = ls_self_pidfd();
	if (pidfd < 0)
		return -errno;
	err = bpf_map_update_elem(fd, &pidfd, &val, BPF_NOEXIST);
	err = err ?: bpf_map_delete_elem(fd, &pidfd);
	err = err ? -errno : 0;
	close(pidfd);
	return err;
}

static void run_case(bool cgrp, int cgroup_fd, __u64 cgid)
{
	struct ls_defer_sleepable *skel = NULL;
	struct ls_defer_uval v;
	struct ls_leak_ck ck;
	struct hold h;
	long long dtor0;
	int pidfd = -1, map_fd, key, err, i;

	hold_init(&h);
	if (!ls_leak_begin(&ck))
		return;
	dtor0 = ck.s.v[LSDEFER_CNT_DTOR];

	skel = ls_defer_sleepable__open_and_load();
	if (!ASSERT_OK_PTR(skel, "ls_defer_sleepable__open_and_load"))
		goto out;
	skel->bss->cgid = cgid;
	if (!hold_start(&h, skel, cgrp))
		goto out;

	if (cgrp) {
		map_fd = bpf_map__fd(skel->maps.cgrp_map);
		key = cgroup_fd;
	} else {
		map_fd = bpf_map__fd(skel->maps.task_map);
		pidfd = sys_pidfd_open(ls_load(&h.r.tid), PIDFD_THREAD);
		if (!ASSERT_OK_FD(pidfd, "pidfd_open reader"))
			goto out;
		key = pidfd;
	}
	if (!ASSERT_OK(bpf_map_lookup_elem(map_fd, &key, &v), "lookup held value") ||
	    !ASSERT_EQ(v.canary, LS_DEFER_CANARY, "held value canary"))
		goto out;
	/*
	 * On one CPU: first an element of storm_map, whose grace period the
	 * program holds in flight, then the held one, which so waits in the
	 * CPU's pending list, where a flush takes it itself.
	 */
	if (!ASSERT_OK(ls_pin_cpu(0), "pin to CPU 0") ||
	    !ASSERT_OK(prime_chain(skel), "an element deleted before"))
		goto out;
	err = bpf_map_delete_elem(map_fd, &key);
	ls_unpin();
	if (!ASSERT_OK(err, "delete the held element"))
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
	/*
	 * Another map's free waits for that map's element, queued behind the
	 * held one: the held element must still wait for the sleeping program.
	 */
	if (ASSERT_OK(free_other_map(skel), "free another task storage map"))
		ASSERT_TRUE(dtor_stays(dtor0, HOLD_MS / 2),
			    "kptr destructor waits for the sleeping program (another map freed)");

out:
	/* Wake the program up */
	if (hold_release(&h)) {
		ASSERT_OK(h.r.err, "test_run");
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
	hold_unmap(&h);
}

/* One line of the engine's stats file (its 9 counters) */
struct storm_line {
	long long queued, batches, gps, freed, flushed, max_pending;
	long long offloads, max_step, max_step_ns;
};

/* The lines storm looks at: cpu's and the totals, of both engines */
struct storm_stats {
	struct storm_line selem, selem_total;
	struct storm_line storage, storage_total;
};

/*
 * Parses LS_ENGINE_STATS: a header, then "<engine> <cpu|total>" and 9
 * counters per line (rust/bpf/bpf_local_storage_defer.rs, StatsFile).
 */
static int storm_read(int cpu, struct storm_stats *s)
{
	char line[256], engine[32], which[32], want[16];
	struct storm_line l, *dst;
	bool selem;
	int n = 0;
	FILE *f;

	memset(s, 0, sizeof(*s));
	snprintf(want, sizeof(want), "%d", cpu);
	f = fopen(LS_ENGINE_STATS, "r");
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		/* the header does not scan */
		if (sscanf(line, "%31s %31s %lld %lld %lld %lld %lld %lld %lld %lld %lld",
			   engine, which, &l.queued, &l.batches, &l.gps, &l.freed,
			   &l.flushed, &l.max_pending, &l.offloads, &l.max_step,
			   &l.max_step_ns) != 11)
			continue;
		if (strcmp(engine, "selem") && strcmp(engine, "storage"))
			continue;
		selem = !strcmp(engine, "selem");
		if (!strcmp(which, want))
			dst = selem ? &s->selem : &s->storage;
		else if (!strcmp(which, "total"))
			dst = selem ? &s->selem_total : &s->storage_total;
		else
			continue;
		*dst = l;
		n++;
	}
	fclose(f);
	return n == 4 ? 0 : -EINVAL;
}

static void storm_print_line(const char *when, const char *engine,
			     const struct storm_line *l)
{
	printf("storm %s: CPU %d %s queued %lld freed %lld gps %lld offloads %lld\n",
	       when, STORM_CPU, engine, l->queued, l->freed, l->gps, l->offloads);
	printf("storm %s: CPU %d %s batches %lld flushed %lld max_pending %lld\n",
	       when, STORM_CPU, engine, l->batches, l->flushed, l->max_pending);
}

static void storm_print(const char *when, const struct storm_stats *s)
{
	storm_print_line(when, "selem", &s->selem);
	storm_print_line(when, "storage", &s->storage);
}

/* delete_storm_held: see the top of the file */
static void run_storm(void)
{
	struct ls_defer_sleepable *skel = NULL;
	__u64 t_held, t_start, t_release, t_selem = 0, t_storage = 0, now, deadline;
	struct storm_stats s0, s;
	struct ls_leak_ck ck;
	struct hold h;
	bool pinned = false;
	long long waiting;
	int i, err;

	hold_init(&h);
	if (access(LS_ENGINE_STATS, R_OK)) {
		printf("%s:SKIP: no engine stats (%s)\n", __func__, LS_ENGINE_STATS);
		test__skip();
		return;
	}
	if (!ls_leak_begin(&ck))
		return;
	skel = ls_defer_sleepable__open_and_load();
	if (!ASSERT_OK_PTR(skel, "ls_defer_sleepable__open_and_load"))
		goto out;
	/* Every delete on one CPU's lists; the reader inherits it, and sleeps */
	if (!ASSERT_OK(ls_pin_cpu(STORM_CPU), "pin to the storm CPU"))
		goto out;
	pinned = true;
	if (!hold_start(&h, skel, false))
		goto out;
	t_held = get_time_ns();
	if (!ASSERT_OK(storm_read(STORM_CPU, &s0), "engine stats before"))
		goto out;
	storm_print("before", &s0);

	skel->bss->storm_loops = STORM_N / STORM_RUNS;
	t_start = get_time_ns();
	for (i = 0; i < STORM_RUNS; i++) {
		LIBBPF_OPTS(bpf_test_run_opts, opts);

		err = bpf_prog_test_run_opts(bpf_program__fd(skel->progs.storm), &opts);
		if (!ASSERT_OK(err, "storm test_run") ||
		    !ASSERT_EQ(opts.retval, STORM_N / STORM_RUNS, "storm bpf_loop iterations"))
			goto out;
	}
	now = get_time_ns();
	printf("storm: %llu deletes in %llu ms (create_fail %llu delete_fail %llu, error %lld)\n",
	       (unsigned long long)skel->bss->storm_deleted,
	       (unsigned long long)(now - t_start) / 1000000,
	       (unsigned long long)skel->bss->storm_create_fail,
	       (unsigned long long)skel->bss->storm_delete_fail,
	       (long long)skel->bss->storm_delete_err);
	if (!ASSERT_EQ(skel->bss->storm_deleted, STORM_N, "deletes"))
		goto out;

	/* Hold the grace period STORM_HOLD_MS at least */
	if (now < t_held + STORM_HOLD_MS * 1000000ULL)
		usleep((t_held + STORM_HOLD_MS * 1000000ULL - now) / 1000);
	if (!ASSERT_OK(storm_read(STORM_CPU, &s), "engine stats while held"))
		goto out;
	storm_print("held", &s);
	/* No grace period that started after the reader went to sleep ended */
	waiting = s.selem.queued - s.selem.freed;
	ASSERT_GE(waiting, (long long)skel->bss->storm_deleted,
		  "deleted selems wait while the reader holds the grace period");

	/* Nothing flushes (the maps are open): the chain alone frees it all */
	t_release = get_time_ns();
	if (hold_release(&h))
		ASSERT_OK(h.r.err, "reader test_run");
	deadline = t_release + STORM_WAIT_MS * 1000000ULL;
	for (;;) {
		if (!ASSERT_OK(storm_read(STORM_CPU, &s), "engine stats after"))
			goto out;
		now = get_time_ns();
		/* as few wait as before the storm: its objects are all freed */
		if (!t_selem && s.selem.queued - s.selem.freed <=
				s0.selem.queued - s0.selem.freed)
			t_selem = now;
		if (!t_storage && s.storage.queued - s.storage.freed <=
				  s0.storage.queued - s0.storage.freed)
			t_storage = now;
		if ((t_selem && t_storage) || now > deadline)
			break;
		usleep(10000);
	}
	storm_print("after", &s);
	printf("storm: longest step: selem %lld objects %lld ns, storage %lld objects %lld ns\n",
	       s.selem_total.max_step, s.selem_total.max_step_ns,
	       s.storage_total.max_step, s.storage_total.max_step_ns);
	if (t_selem)
		printf("storm: selems freed %llu ms after the release\n",
		       (unsigned long long)(t_selem - t_release) / 1000000);
	if (t_storage)
		printf("storm: storages freed %llu ms after the release\n",
		       (unsigned long long)(t_storage - t_release) / 1000000);
	ASSERT_TRUE(t_selem, "the storm's selems all freed within 60 s of the release");
	ASSERT_TRUE(t_storage, "the storm's storages all freed within 60 s of the release");
	ASSERT_LE(s.selem_total.max_step, FREE_CHUNK, "selem max_step <= FREE_CHUNK");
	ASSERT_LE(s.storage_total.max_step, FREE_CHUNK, "storage max_step <= FREE_CHUNK");
	ASSERT_GE(s.selem.offloads - s0.selem.offloads, 1,
		  "the large selem batch went on in the free work (offloads)");
	ASSERT_LE(s.selem.gps - s0.selem.gps, STORM_MAX_GPS,
		  "the deletes rode a few grace periods (gps)");

out:
	hold_release(&h);
	if (pinned)
		ASSERT_OK(ls_unpin(), "unpin");
	if (skel) {
		ls_defer_sleepable__destroy(skel);
		ls_leak_end(&ck);
	}
	hold_unmap(&h);
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
	if (test__start_subtest("delete_storm_held"))
		run_storm();
	close(cgroup_fd);
}
