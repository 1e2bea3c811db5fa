// SPDX-License-Identifier: GPL-2.0
/*
 * Benchmarks of the BPF local storage free path, the same on the stock
 * kernel and on the deferred-free engine (progs/local_storage_defer_bench.c):
 *
 *   ls-defer-delete      producers loop on getpgid(); on each call a tracing
 *                        program creates and deletes the thread's task
 *                        storage --defer-loops times (task context).
 *                        --defer-value kptr: the 64-byte value holds a
 *                        referenced kptr (lsdefer_testmod's object).
 *   ls-defer-update      producers replace their thread's element with
 *                        BPF_MAP_UPDATE_ELEM(BPF_EXIST): every replaced
 *                        element is freed.
 *   ls-defer-nmi-delete  producer 0 raises NMIs (lsdefer_testmod's
 *                        nmi_storm) on the CPUs of producers 1..N-1, which
 *                        spin in user space; the NMI program creates and
 *                        deletes their storage --defer-nmi-loops times. 7.3
 *                        refuses the deletes (counted, 0 ops).
 *   ls-defer-exit        producers start --defer-batch short-lived threads
 *                        at a time; each creates its storage, deletes it and
 *                        exits.
 *   ls-defer-map-churn   producer 0 creates --defer-maps task storage maps,
 *                        puts --defer-elems elements in each and closes them
 *                        (at most MAX_INFLIGHT_MAPS closed and not freed yet);
 *                        producers 1..N-1 run the delete churn meanwhile. Ops
 *                        are maps freed; the latency is close to the end of
 *                        bpf_local_storage_map_free().
 *
 * --defer-sleepers N forks N processes that sleep 0-3 s and create and delete
 * their own storage on each wakeup: local-storage-tasks-trace's idea (Tasks
 * Trace grace periods under many tasks), whose rcu_tasks_trace_pregp_step()
 * and rcu_tasks_trace_postgp() 7.3's SRCU-based Tasks Trace no longer has.
 * Here the delete-to-free latency stands for the grace-period latency.
 *
 * Over the measured seconds (after the warm-up) every benchmark reports ops/s
 * and: call_rcu_tasks_trace() calls and Tasks Trace grace periods per op
 * (both kernels, from a probe on call_srcu() and the srcu_struct's sequence),
 * the delete-to-free latency p50/p99, the peak of deleted values not yet
 * freed (both kernels, from the programs' counts) and, where the engine's
 * debugfs stats exist, its grace periods per op and its peak pending objects
 * and bytes. The last line of the output is one JSON object:
 * "lsdefer-bench: {...}".
 */
#include <argp.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <bpf/btf.h>

#include "bench.h"
#include "bpf_util.h"
#include "testing_helpers.h"
#include "lsdefer_testmod.h"
#include "ls_write_str.h"
#include "local_storage_defer_bench.h"
#include "local_storage_defer_bench.skel.h"

#ifndef PIDFD_THREAD
#define PIDFD_THREAD		O_EXCL
#endif

#define ENGINE_STATS		"/sys/kernel/debug/bpf_local_storage_defer/stats"
#define LSDEFER_MODULE		"/sys/module/" LSDEFER_MOD_NAME
/* Peak sampling period */
#define SAMPLE_US		10000
/* Map churn: maps closed whose free has not finished, at most */
#define MAX_INFLIGHT_MAPS	64
#define MAX_CHURN_MAPS		1024
#define MAX_CHURN_ELEMS		1024
#define NMIS_PER_WRITE		1000

enum lsdb_workload {
	WL_DELETE,
	WL_UPDATE,
	WL_NMI,
	WL_EXIT,
	WL_MAP_CHURN,
};

static struct {
	bool kptr;
	int loops;
	int nmi_loops;
	int batch;
	int maps;
	int elems;
	int sleepers;
} args = {
	.loops = 16,
	.nmi_loops = 4,
	.batch = 16,
	.maps = 8,
	.elems = 16,
};

enum {
	ARG_DEFER_VALUE = 12000,
	ARG_DEFER_LOOPS,
	ARG_DEFER_NMI_LOOPS,
	ARG_DEFER_BATCH,
	ARG_DEFER_MAPS,
	ARG_DEFER_ELEMS,
	ARG_DEFER_SLEEPERS,
};

/* Prefixed: bench.c parses every benchmark's options at once first */
static const struct argp_option opts[] = {
	{ "defer-value", ARG_DEFER_VALUE, "KIND", 0,
	  "ls-defer-delete value: plain (default) or kptr (needs lsdefer_testmod)" },
	{ "defer-loops", ARG_DEFER_LOOPS, "N", 0,
	  "creates+deletes per getpgid() call (default 16)" },
	{ "defer-nmi-loops", ARG_DEFER_NMI_LOOPS, "N", 0,
	  "creates+deletes per NMI (default 4)" },
	{ "defer-batch", ARG_DEFER_BATCH, "N", 0,
	  "ls-defer-exit: threads started per batch (default 16)" },
	{ "defer-maps", ARG_DEFER_MAPS, "N", 0,
	  "ls-defer-map-churn: maps per round (default 8)" },
	{ "defer-elems", ARG_DEFER_ELEMS, "N", 0,
	  "ls-defer-map-churn: elements per map (default 16)" },
	{ "defer-sleepers", ARG_DEFER_SLEEPERS, "N", 0,
	  "fork N sleeping processes that churn their storage on wakeup (default 0)" },
	{},
};

static int parse_int(const char *arg, int min, int max, const char *what,
		     struct argp_state *state)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(arg, &end, 10);
	if (errno || *end || v < min || v > max) {
		fprintf(stderr, "invalid %s: %s (want %d..%d)\n", what, arg, min, max);
		argp_usage(state);
	}
	return v;
}

static error_t parse_arg(int key, char *arg, struct argp_state *state)
{
	switch (key) {
	case ARG_DEFER_VALUE:
		if (!strcmp(arg, "kptr")) {
			args.kptr = true;
		} else if (!strcmp(arg, "plain")) {
			args.kptr = false;
		} else {
			fprintf(stderr, "invalid defer-value: %s (plain or kptr)\n", arg);
			argp_usage(state);
		}
		break;
	case ARG_DEFER_LOOPS:
		args.loops = parse_int(arg, 1, 1 << 16, "defer-loops", state);
		break;
	case ARG_DEFER_NMI_LOOPS:
		args.nmi_loops = parse_int(arg, 1, 1024, "defer-nmi-loops", state);
		break;
	case ARG_DEFER_BATCH:
		args.batch = parse_int(arg, 1, 4096, "defer-batch", state);
		break;
	case ARG_DEFER_MAPS:
		args.maps = parse_int(arg, 1, MAX_CHURN_MAPS, "defer-maps", state);
		break;
	case ARG_DEFER_ELEMS:
		args.elems = parse_int(arg, 0, MAX_CHURN_ELEMS, "defer-elems", state);
		break;
	case ARG_DEFER_SLEEPERS:
		args.sleepers = parse_int(arg, 0, 100000, "defer-sleepers", state);
		break;
	default:
		return ARGP_ERR_UNKNOWN;
	}
	return 0;
}

const struct argp bench_local_storage_defer_argp = {
	.options = opts,
	.parser = parse_arg,
};

/* Sums of the "total" lines of the engine's stats file, one per engine */
struct eng {
	__u64 queued, batches, gps, freed, flushed, max_pending, offloads;
	__u64 max_step, max_step_ns;
};

struct eng_snap {
	struct eng selem, storage;
};

/* Everything counted at one instant; the window is end - start */
struct snap {
	struct lsdb_cnt c;
	__u64 user_ops;
	__u64 gp_seq;
	struct eng_snap e;
	bool eng_ok;
};

static struct {
	struct local_storage_defer_bench *skel;
	enum lsdb_workload wl;
	const char *name;
	int nr_cpus;		/* possible CPUs: per-CPU map values */
	struct lsdb_cnt *pcpu;	/* main thread's buffer for cnt_sum() */
	int cnt_fd, task_map_fd, close_ts_fd, gp_prog_fd;
	bool engine;		/* the engine's stats file is there */
	long selem_size, storage_size;	/* kmalloc'ed bytes per object */

	struct counter *prod_ops;	/* ls-defer-update: per producer */
	struct counter *prod_errs;
	long owner_errs;	/* thread starts, map creates, updates, NMI writes */
	int *owner_pidfds;	/* ls-defer-map-churn: owners of the elements */
	int owners_ready;

	__u64 last_ops;		/* measure(): ops at the previous call */
	__u64 last_refused;
	struct snap start, end;
	long window_ns;
	__u64 hist_start[LSDB_HIST_N], map_hist_start[LSDB_HIST_N];
	__u64 hist_end[LSDB_HIST_N], map_hist_end[LSDB_HIST_N];
	int measuring;		/* the sampler tracks peaks */
	long peak_pending;	/* deleted values not freed yet (programs' view) */
	long peak_eng_objs;	/* engine: queued - freed, selems + storages */
	long peak_eng_bytes;
	/*
	 * The same peak over the first and the second half of the measured
	 * seconds: bounded pending memory shows as a second half no higher
	 * than the first (a leak or a lagging chain grows it).
	 */
	long peak_eng_half[2];
	__u64 measure_start_ns;	/* when the sampler started tracking */
} ctx;

static void die(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", ctx.name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	exit(1);
}

static int pin_self(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

/* A pidfd for the calling thread: the key of its task storage */
static int pidfd_self(void)
{
	pid_t tid = syscall(SYS_gettid);
	int fd = syscall(SYS_pidfd_open, tid, PIDFD_THREAD);

	if (fd < 0 && tid == getpid())
		fd = syscall(SYS_pidfd_open, getpid(), 0);
	return fd;
}

static struct lsdb_cnt *pcpu_buf(void)
{
	struct lsdb_cnt *buf = calloc(ctx.nr_cpus, sizeof(*buf));

	if (!buf)
		die("out of memory");
	return buf;
}

/*
 * Sum of every CPU's counters (last_err: any CPU's); buf holds one value per
 * possible CPU and belongs to the calling thread.
 */
static void cnt_sum(struct lsdb_cnt *sum, struct lsdb_cnt *buf)
{
	const int nr = offsetof(struct lsdb_cnt, last_err) / sizeof(__u64);
	__u32 zero = 0;
	int cpu, i;

	memset(sum, 0, sizeof(*sum));
	if (bpf_map_lookup_elem(ctx.cnt_fd, &zero, buf))
		return;
	for (cpu = 0; cpu < ctx.nr_cpus; cpu++) {
		const __u64 *v = (const __u64 *)&buf[cpu];

		for (i = 0; i < nr; i++)
			((__u64 *)sum)[i] += v[i];
		if (buf[cpu].last_err)
			sum->last_err = buf[cpu].last_err;
	}
}

static __u64 user_ops(void)
{
	__u64 n = 0;
	int i;

	if (!ctx.prod_ops)
		return 0;
	for (i = 0; i < env.producer_cnt; i++)
		n += __atomic_load_n(&ctx.prod_ops[i].value, __ATOMIC_RELAXED);
	return n;
}

/* What the workload counts as one op */
static __u64 ops_of(const struct lsdb_cnt *c, __u64 uops)
{
	switch (ctx.wl) {
	case WL_UPDATE:
		return uops;
	case WL_MAP_CHURN:
		return c->maps_freed;
	default:
		return c->del_ok;
	}
}

/* Values whose free the probe will see: deleted or replaced ones */
static __u64 retired_of(const struct lsdb_cnt *c, __u64 uops)
{
	return ctx.wl == WL_UPDATE ? uops : c->del_ok;
}

static __u64 read_gp_seq(void)
{
	LIBBPF_OPTS(bpf_test_run_opts, topts);

	if (bpf_prog_test_run_opts(ctx.gp_prog_fd, &topts) || topts.retval)
		return 0;
	return ctx.skel->bss->gp_seq;
}

static bool eng_parse_line(const char *line, struct eng_snap *s)
{
	char name[32], cpu[32];
	struct eng e;

	if (sscanf(line, "%31s %31s %llu %llu %llu %llu %llu %llu %llu %llu %llu",
		   name, cpu, &e.queued, &e.batches, &e.gps, &e.freed, &e.flushed,
		   &e.max_pending, &e.offloads, &e.max_step, &e.max_step_ns) != 11 ||
	    strcmp(cpu, "total"))
		return false;
	if (!strcmp(name, "selem"))
		s->selem = e;
	else if (!strcmp(name, "storage"))
		s->storage = e;
	else
		return false;
	return true;
}

/*
 * The engine's "total" lines. open/read: also called from measure(), in the
 * bench's SIGALRM handler.
 */
static bool eng_read(struct eng_snap *s)
{
	char buf[32768], *line, *save = NULL;
	int fd, n, len = 0, found = 0;

	memset(s, 0, sizeof(*s));
	if (!ctx.engine)
		return false;
	fd = open(ENGINE_STATS, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	while (len < (int)sizeof(buf) - 1 &&
	       (n = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0)
		len += n;
	close(fd);
	buf[len] = '\0';
	for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
		found += eng_parse_line(line, s);
	return found == 2;
}

/* Main thread only (report_progress()) */
static void take_snap(struct snap *s)
{
	cnt_sum(&s->c, ctx.pcpu);
	s->user_ops = user_ops();
	s->gp_seq = read_gp_seq();
	s->eng_ok = eng_read(&s->e);
}

/* Objects the engine holds, selems and storages: queued - freed */
static long eng_pending(const struct eng_snap *e, long *sp, long *tp)
{
	*sp = (long)(e->selem.queued - e->selem.freed);
	*tp = (long)(e->storage.queued - e->storage.freed);
	return *sp + *tp;
}

static void sample_peaks(struct lsdb_cnt *buf)
{
	struct eng_snap e;
	struct lsdb_cnt c;
	long pend, sp, tp, objs;
	int half;

	cnt_sum(&c, buf);
	pend = (long)(retired_of(&c, user_ops()) - c.freed);
	if (pend > ctx.peak_pending)
		ctx.peak_pending = pend;
	if (!eng_read(&e))
		return;
	objs = eng_pending(&e, &sp, &tp);
	if (objs > ctx.peak_eng_objs)
		ctx.peak_eng_objs = objs;
	if (sp * ctx.selem_size + tp * ctx.storage_size > ctx.peak_eng_bytes)
		ctx.peak_eng_bytes = sp * ctx.selem_size + tp * ctx.storage_size;
	half = get_time_ns() - ctx.measure_start_ns >= env.duration_sec * 500000000ULL;
	if (objs > ctx.peak_eng_half[half])
		ctx.peak_eng_half[half] = objs;
}

static void *sampler(void *arg)
{
	struct lsdb_cnt *buf = pcpu_buf();

	for (;;) {
		usleep(SAMPLE_US);
		if (__atomic_load_n(&ctx.measuring, __ATOMIC_ACQUIRE))
			sample_peaks(buf);
	}
	return NULL;
}

/* The slab object kmalloc() hands out for n bytes */
static long kmalloc_size(long n)
{
	static const long sizes[] = { 8, 16, 32, 64, 96, 128, 192, 256, 512,
				      1024, 2048, 4096, 8192 };
	int i;

	for (i = 0; i < ARRAY_SIZE(sizes); i++)
		if (n <= sizes[i])
			return sizes[i];
	return (n + 4095) & ~4095L;
}

/* Byte offset of member name in struct sname, or -1 */
static long member_off(const struct btf *btf, const char *sname, const char *name)
{
	const struct btf_member *m;
	const struct btf_type *t;
	int id, i;

	id = btf__find_by_name_kind(btf, sname, BTF_KIND_STRUCT);
	if (id < 0)
		return -1;
	t = btf__type_by_id(btf, id);
	m = btf_members(t);
	for (i = 0; i < btf_vlen(t); i++, m++)
		if (!strcmp(btf__name_by_offset(btf, m->name_off), name))
			return btf_member_bit_offset(t, i) / 8;
	return -1;
}

/*
 * Object sizes for the engine's pending bytes, from the kernel's BTF: an
 * element is offsetof(struct bpf_local_storage_elem, sdata.data[value_size])
 * (bpf_local_storage_map_alloc()), a storage sizeof(struct bpf_local_storage).
 * 0 if the BTF does not tell.
 */
static void obj_sizes(void)
{
	long sdata, data;
	struct btf *btf;
	int id;

	btf = btf__load_vmlinux_btf();
	if (!btf)
		return;
	sdata = member_off(btf, "bpf_local_storage_elem", "sdata");
	data = member_off(btf, "bpf_local_storage_data", "data");
	if (sdata >= 0 && data >= 0)
		ctx.selem_size = kmalloc_size(sdata + data + sizeof(struct lsdb_val));
	id = btf__find_by_name_kind(btf, "bpf_local_storage", BTF_KIND_STRUCT);
	if (id > 0 && btf__resolve_size(btf, id) > 0)
		ctx.storage_size = kmalloc_size(btf__resolve_size(btf, id));
	btf__free(btf);
}

/*
 * local-storage-tasks-trace's sleepers: each wakes up every 0-3 s and
 * creates and deletes its task storage (lsdb_getpgid takes the bench's
 * children as its own).
 */
static void fork_sleepers(void)
{
	pid_t parent = getpid(), pid;
	int i;

	for (i = 0; i < args.sleepers; i++) {
		pid = fork();
		if (pid < 0)
			die("fork of a sleeper failed: %s", strerror(errno));
		if (pid)
			continue;
		if (prctl(PR_SET_PDEATHSIG, SIGKILL) || getppid() != parent)
			_exit(1);
		srand(getpid());
		for (;;) {
			sleep(rand() % 4);
			syscall(__NR_getpgid, LSDB_PID(LSDB_OP_CREATE));
			syscall(__NR_getpgid, LSDB_PID(LSDB_OP_DELETE));
		}
	}
	printf("Forked %d sleepers\n", args.sleepers);
}

/* ls-defer-map-churn: threads that own the churn maps' elements */
static void *owner_thread(void *arg)
{
	long i = (long)arg;

	ctx.owner_pidfds[i] = pidfd_self();
	__atomic_add_fetch(&ctx.owners_ready, 1, __ATOMIC_RELEASE);
	for (;;)
		pause();
	return NULL;
}

static void start_owners(void)
{
	pthread_t t;
	long i;

	ctx.owner_pidfds = calloc(args.elems, sizeof(int));
	if (!ctx.owner_pidfds && args.elems)
		die("cannot allocate the owners' pidfds");
	for (i = 0; i < args.elems; i++)
		if (pthread_create(&t, NULL, owner_thread, (void *)i))
			die("cannot start an element owner thread");
	while (__atomic_load_n(&ctx.owners_ready, __ATOMIC_ACQUIRE) < args.elems)
		usleep(1000);
	for (i = 0; i < args.elems; i++)
		if (ctx.owner_pidfds[i] < 0)
			die("pidfd_open() of an owner thread failed");
}

static void validate(void)
{
	if (env.consumer_cnt) {
		fprintf(stderr, "%s: no consumers\n", ctx.name);
		exit(1);
	}
	if (env.producer_cnt < 1) {
		fprintf(stderr, "%s: needs a producer\n", ctx.name);
		exit(1);
	}
	if (ctx.wl == WL_NMI && (env.producer_cnt < 2 || env.nr_cpus < 2)) {
		fprintf(stderr, "%s: needs 2 CPUs and 2 producers %s\n",
			ctx.name, "(one raises NMIs on the other's CPU)");
		exit(1);
	}
	if ((ctx.wl == WL_NMI || args.kptr) && access(LSDEFER_MODULE, F_OK)) {
		fprintf(stderr, "%s: needs %s loaded (insmod %s.ko, %s)\n",
			ctx.name, LSDEFER_MOD_NAME, LSDEFER_MOD_NAME,
			"built from the repo's Kbuild");
		exit(1);
	}
	if (ctx.wl == WL_NMI && access(LSDEFER_NMI_STORM, W_OK)) {
		fprintf(stderr, "%s: no %s (x86 only; is debugfs mounted?)\n",
			ctx.name, LSDEFER_NMI_STORM);
		exit(1);
	}
}

static void attach_prog(struct bpf_program *prog)
{
	if (!bpf_program__attach(prog))
		die("cannot attach %s: %s", bpf_program__name(prog), strerror(errno));
}

static void setup(void)
{
	struct local_storage_defer_bench *skel;
	pthread_t t;
	int err;

	if (args.sleepers)
		fork_sleepers();
	setup_libbpf();

	ctx.nr_cpus = libbpf_num_possible_cpus();
	if (ctx.nr_cpus <= 0)
		die("cannot count the possible CPUs");
	ctx.pcpu = pcpu_buf();
	ctx.prod_ops = calloc(env.producer_cnt, sizeof(*ctx.prod_ops));
	ctx.prod_errs = calloc(env.producer_cnt, sizeof(*ctx.prod_errs));
	if (!ctx.prod_ops || !ctx.prod_errs)
		die("out of memory");

	skel = local_storage_defer_bench__open();
	if (!skel)
		die("cannot open the skeleton");
	ctx.skel = skel;
	/* Only what this workload uses: the module may be missing. */
	bpf_program__set_autoload(skel->progs.lsdb_getpgid,
				  ctx.wl == WL_EXIT || ctx.wl == WL_MAP_CHURN ||
				  (ctx.wl == WL_DELETE && !args.kptr) || args.sleepers);
	bpf_program__set_autoload(skel->progs.lsdb_getpgid_kptr,
				  ctx.wl == WL_DELETE && args.kptr);
	bpf_program__set_autoload(skel->progs.lsdb_nmi, ctx.wl == WL_NMI);
	bpf_program__set_autoload(skel->progs.lsdb_map_freed, ctx.wl == WL_MAP_CHURN);
	bpf_map__set_autocreate(skel->maps.kptr_map, ctx.wl == WL_DELETE && args.kptr);
	skel->bss->bench_tgid = getpid();
	skel->data->churn_loops = args.loops;
	skel->data->plain_churn = !args.kptr;
	skel->data->nmi_loops = args.nmi_loops;
	err = local_storage_defer_bench__load(skel);
	if (err)
		die("cannot load the skeleton: %s", strerror(-err));

	ctx.cnt_fd = bpf_map__fd(skel->maps.cnt);
	ctx.task_map_fd = bpf_map__fd(skel->maps.task_map);
	ctx.close_ts_fd = bpf_map__fd(skel->maps.close_ts);
	ctx.gp_prog_fd = bpf_program__fd(skel->progs.lsdb_read_gp_seq);
	attach_prog(skel->progs.lsdb_free);
	attach_prog(skel->progs.lsdb_call_srcu);
	if (bpf_program__autoload(skel->progs.lsdb_getpgid))
		attach_prog(skel->progs.lsdb_getpgid);
	if (bpf_program__autoload(skel->progs.lsdb_getpgid_kptr))
		attach_prog(skel->progs.lsdb_getpgid_kptr);
	if (ctx.wl == WL_NMI)
		attach_prog(skel->progs.lsdb_nmi);
	if (ctx.wl == WL_MAP_CHURN) {
		attach_prog(skel->progs.lsdb_map_freed);
		start_owners();
	}
	if (!read_gp_seq())
		fprintf(stderr, "%s: %s: gps reported as 0\n", ctx.name,
			"no Tasks Trace grace-period sequence (rcu_tasks_trace_srcu_struct not in kallsyms?)");

	ctx.engine = !access(ENGINE_STATS, R_OK);
	obj_sizes();
	if (pthread_create(&t, NULL, sampler, NULL))
		die("cannot start the sampler thread");
}

static void *delete_producer(void *input)
{
	for (;;)
		syscall(__NR_getpgid, LSDB_PID(LSDB_OP_CHURN));
	return NULL;
}

static void *update_producer(void *input)
{
	long i = (long)input;
	struct lsdb_val v = { .magic = LSDB_MAGIC };
	int pidfd = pidfd_self();

	if (pidfd < 0)
		die("pidfd_open() failed: %s", strerror(errno));
	/* t_del: the replaced value's own update, one loop before its free */
	v.t_del = get_time_ns();
	if (bpf_map_update_elem(ctx.task_map_fd, &pidfd, &v, BPF_NOEXIST))
		die("first update failed: %s", strerror(errno));
	for (;;) {
		v.t_del = get_time_ns();
		if (bpf_map_update_elem(ctx.task_map_fd, &pidfd, &v, BPF_EXIST))
			atomic_inc(&ctx.prod_errs[i].value);
		else
			atomic_inc(&ctx.prod_ops[i].value);
	}
	return NULL;
}

/* Producer 0 raises NMIs on CPUs 1..targets, where the others spin. */
static void *nmi_producer(void *input)
{
	int targets = env.producer_cnt - 1, t = 0;
	long i = (long)input;
	char cmd[64];

	if (targets > env.nr_cpus - 1)
		targets = env.nr_cpus - 1;
	if (i) {
		if (pin_self((i - 1) % targets + 1))
			atomic_inc(&ctx.owner_errs);
		for (;;)
			__asm__ __volatile__("" ::: "memory");
	}
	if (pin_self(0))
		atomic_inc(&ctx.owner_errs);
	for (;;) {
		snprintf(cmd, sizeof(cmd), "%d %d 0", t + 1, NMIS_PER_WRITE);
		if (ls_write_str(LSDEFER_NMI_STORM, cmd)) {
			atomic_inc(&ctx.owner_errs);
			usleep(1000);
		}
		t = (t + 1) % targets;
	}
	return NULL;
}

static void *exit_thread(void *arg)
{
	syscall(__NR_getpgid, LSDB_PID(LSDB_OP_CREATE));
	syscall(__NR_getpgid, LSDB_PID(LSDB_OP_DELETE));
	return NULL;
}

static void *exit_producer(void *input)
{
	pthread_t *thr = calloc(args.batch, sizeof(*thr));
	int *rc = calloc(args.batch, sizeof(*rc));
	int i;

	if (!thr || !rc)
		die("out of memory");
	for (;;) {
		for (i = 0; i < args.batch; i++) {
			rc[i] = pthread_create(&thr[i], NULL, exit_thread, NULL);
			if (rc[i])
				atomic_inc(&ctx.owner_errs);
		}
		for (i = 0; i < args.batch; i++)
			if (!rc[i])
				pthread_join(thr[i], NULL);
	}
	return NULL;
}

static __u64 maps_freed(struct lsdb_cnt *buf)
{
	struct lsdb_cnt c;

	cnt_sum(&c, buf);
	return c.maps_freed;
}

/* Create, populate and close args.maps maps per round; never far ahead of their frees */
static void *map_churner(void)
{
	LIBBPF_OPTS(bpf_map_create_opts, o, .map_flags = BPF_F_NO_PREALLOC);
	struct lsdb_cnt *buf = pcpu_buf();
	struct lsdb_val v = { .magic = LSDB_MAGIC };
	struct lsdb_map_name *names;
	__u64 closed = 0, made = 0, t;
	int *fds, m, k;

	o.btf_fd = bpf_object__btf_fd(ctx.skel->obj);
	o.btf_key_type_id = bpf_map__btf_key_type_id(ctx.skel->maps.task_map);
	o.btf_value_type_id = bpf_map__btf_value_type_id(ctx.skel->maps.task_map);
	fds = calloc(args.maps, sizeof(*fds));
	names = calloc(args.maps, sizeof(*names));
	if (!fds || !names)
		die("out of memory");
	for (;;) {
		while (closed > maps_freed(buf) + MAX_INFLIGHT_MAPS)
			usleep(1000);
		for (m = 0; m < args.maps; m++) {
			memset(&names[m], 0, sizeof(names[m]));
			snprintf(names[m].name, sizeof(names[m].name), "lsdb%010llu",
				 (unsigned long long)made++);
			fds[m] = bpf_map_create(BPF_MAP_TYPE_TASK_STORAGE, names[m].name,
						sizeof(int), sizeof(v), 0, &o);
			if (fds[m] < 0) {
				atomic_inc(&ctx.owner_errs);
				continue;
			}
			for (k = 0; k < args.elems; k++)
				if (bpf_map_update_elem(fds[m], &ctx.owner_pidfds[k], &v, BPF_ANY))
					atomic_inc(&ctx.owner_errs);
		}
		for (m = 0; m < args.maps; m++) {
			if (fds[m] < 0)
				continue;
			t = get_time_ns();
			/* CLOCK_MONOTONIC, as bpf_ktime_get_ns() */
			if (bpf_map_update_elem(ctx.close_ts_fd, &names[m], &t, BPF_ANY))
				atomic_inc(&ctx.owner_errs);
			close(fds[m]);
			closed++;
		}
	}
	return NULL;
}

static void *producer(void *input)
{
	switch (ctx.wl) {
	case WL_UPDATE:
		return update_producer(input);
	case WL_NMI:
		return nmi_producer(input);
	case WL_EXIT:
		return exit_producer(input);
	case WL_MAP_CHURN:
		if (!(long)input)
			return map_churner();
		return delete_producer(input);
	default:
		return delete_producer(input);
	}
}

/* In the SIGALRM handler, on the main thread */
static void measure(struct bench_res *res)
{
	struct lsdb_cnt c;
	__u64 ops;

	cnt_sum(&c, ctx.pcpu);
	ops = ops_of(&c, user_ops());
	res->hits = ops - ctx.last_ops;
	res->drops = c.del_refused - ctx.last_refused;
	ctx.last_ops = ops;
	ctx.last_refused = c.del_refused;
}

/* The window: from the end of the warm-up to the last measured second */
static void report_progress(int iter, struct bench_res *res, long delta_ns)
{
	double rate = res->hits / (delta_ns / 1e9);
	struct eng_snap e;
	long sp, tp;

	if (iter >= env.warmup_sec && iter <= env.warmup_sec + env.duration_sec)
		ctx.window_ns += delta_ns;
	if (iter == env.warmup_sec - 1) {
		take_snap(&ctx.start);
		memcpy(ctx.hist_start, ctx.skel->bss->lat_hist, sizeof(ctx.hist_start));
		memcpy(ctx.map_hist_start, ctx.skel->bss->map_hist, sizeof(ctx.map_hist_start));
		ctx.measure_start_ns = get_time_ns();
		__atomic_store_n(&ctx.measuring, 1, __ATOMIC_RELEASE);
	} else if (iter == env.warmup_sec + env.duration_sec) {
		__atomic_store_n(&ctx.measuring, 0, __ATOMIC_RELEASE);
		take_snap(&ctx.end);
		memcpy(ctx.hist_end, ctx.skel->bss->lat_hist, sizeof(ctx.hist_end));
		memcpy(ctx.map_hist_end, ctx.skel->bss->map_hist, sizeof(ctx.map_hist_end));
	}
	if (env.quiet)
		return;
	printf("Iter %3d (%7.3lfus): ops %10.3lfk/s (%8.3lfk/prod)",
	       iter, (delta_ns - 1000000000) / 1000.0, rate / 1000.0,
	       rate / 1000.0 / env.producer_cnt);
	if (res->drops)
		printf(", refused %ld", res->drops);
	if (eng_read(&e))
		printf(", engine pending %ld", eng_pending(&e, &sp, &tp));
	printf("\n");
}

/* Middle of histogram bucket idx, ns (see hist_add() in the program) */
static double hist_mid(int idx)
{
	int msb, sub;

	if (idx < LSDB_HIST_SUB)
		return idx;
	msb = idx / LSDB_HIST_SUB + 2;
	sub = idx % LSDB_HIST_SUB;
	return (double)((__u64)(LSDB_HIST_SUB + sub) << (msb - 3)) +
	       (double)(1ULL << (msb - 3)) / 2;
}

/* Percentile pct (0..1) of end - start, in us; -1 without samples */
static double hist_pct_us(const __u64 *end, const __u64 *start, double pct, __u64 *samples)
{
	__u64 total = 0, acc = 0, want;
	int i;

	for (i = 0; i < LSDB_HIST_N; i++)
		total += end[i] - start[i];
	*samples = total;
	if (!total)
		return -1;
	want = (__u64)ceil(total * pct);
	if (!want)
		want = 1;
	for (i = 0; i < LSDB_HIST_N; i++) {
		acc += end[i] - start[i];
		if (acc >= want)
			return hist_mid(i) / 1000.0;
	}
	return hist_mid(LSDB_HIST_N - 1) / 1000.0;
}

static double per(double a, double b)
{
	return b > 0 ? a / b : 0;
}

/* One JSON object on one line, key by key */
static bool json_first;

static void json_key(const char *key)
{
	printf("%s\"%s\":", json_first ? "" : ",", key);
	json_first = false;
}

static void json_open(const char *key)
{
	if (key)
		json_key(key);
	printf("{");
	json_first = true;
}

static void json_close(void)
{
	printf("}");
	json_first = false;
}

static void json_u64(const char *key, __u64 v)
{
	json_key(key);
	printf("%llu", (unsigned long long)v);
}

static void json_s64(const char *key, long long v)
{
	json_key(key);
	printf("%lld", v);
}

/* Without samples: null, not a number */
static void json_dbl(const char *key, double v, bool valid)
{
	json_key(key);
	if (valid)
		printf("%.6f", v);
	else
		printf("null");
}

static void json_str(const char *key, const char *v)
{
	json_key(key);
	printf("\"%s\"", v);
}

static void json_eng(const char *key, const struct eng *e, const struct eng *s)
{
	json_open(key);
	json_u64("queued", e->queued - s->queued);
	json_u64("gps", e->gps - s->gps);
	json_u64("freed", e->freed - s->freed);
	json_u64("batches", e->batches - s->batches);
	json_u64("offloads", e->offloads - s->offloads);
	/* Since boot: the engine keeps maxima only */
	json_u64("max_pending", e->max_pending);
	json_u64("max_step", e->max_step);
	json_u64("max_step_ns", e->max_step_ns);
	json_close();
}

struct window {
	double mean, sd, secs;
	__u64 ops, srcu, gps, lat_n, map_n;
	double p50, p99, m50, m99;
};

static void print_summary(const struct window *w)
{
	const struct lsdb_cnt *c = &ctx.end.c;

	printf("Summary: ops %10.3lf \u00B1 %8.3lfk/s (%8.3lfk/prod)",
	       w->mean / 1000.0, w->sd / 1000.0, w->mean / 1000.0 / env.producer_cnt);
	printf(", call_rcu_tasks_trace/op %.4lf, Tasks Trace gps/op %.6lf",
	       per(w->srcu, w->ops), per(w->gps, w->ops));
	printf(", delete-to-free p50 %.1lfus p99 %.1lfus, peak pending %ld",
	       w->p50, w->p99, ctx.peak_pending);
	if (ctx.end.eng_ok)
		printf(", engine peak pending %ld objects %ld bytes",
		       ctx.peak_eng_objs, ctx.peak_eng_bytes);
	if (ctx.wl == WL_MAP_CHURN)
		printf(", map close-to-free p50 %.1lfus p99 %.1lfus", w->m50, w->m99);
	printf("\n");
	if (c->del_refused || c->del_busy || c->del_other || c->create_fail ||
	    c->obj_fail || ctx.owner_errs) {
		printf("Errors: deletes refused %llu busy %llu other %llu (last %lld)",
		       c->del_refused, c->del_busy, c->del_other, c->last_err);
		printf(", creates failed %llu, objects failed %llu, user space %ld\n",
		       c->create_fail, c->obj_fail, ctx.owner_errs);
	}
}

static void print_json(const struct window *w)
{
	const struct lsdb_cnt *c0 = &ctx.start.c, *c1 = &ctx.end.c;
	const struct eng_snap *e0 = &ctx.start.e, *e1 = &ctx.end.e;

	printf("lsdefer-bench: ");
	json_open(NULL);
	json_str("bench", ctx.name);
	json_str("value", args.kptr ? "kptr" : "plain");
	json_s64("producers", env.producer_cnt);
	json_s64("nr_cpus", env.nr_cpus);
	json_s64("sleepers", args.sleepers);
	json_s64("loops", ctx.wl == WL_NMI ? args.nmi_loops : args.loops);
	json_dbl("secs", w->secs, true);
	json_u64("ops", w->ops);
	json_dbl("ops_per_sec", w->mean, true);
	json_dbl("ops_per_sec_stddev", w->sd, true);
	json_u64("del_ok", c1->del_ok - c0->del_ok);
	json_u64("del_refused", c1->del_refused - c0->del_refused);
	json_u64("del_busy", c1->del_busy - c0->del_busy);
	json_u64("del_enoent", c1->del_enoent - c0->del_enoent);
	json_u64("del_other", c1->del_other - c0->del_other);
	json_u64("create_ok", c1->create_ok - c0->create_ok);
	json_u64("create_fail", c1->create_fail - c0->create_fail);
	json_u64("obj_fail", c1->obj_fail - c0->obj_fail);
	json_u64("nmi_runs", c1->nmi_runs - c0->nmi_runs);
	json_s64("user_errors", ctx.owner_errs);
	json_u64("srcu_calls", w->srcu);
	json_dbl("srcu_calls_per_op", per(w->srcu, w->ops), w->ops > 0);
	json_u64("gps", w->gps);
	json_dbl("gps_per_op", per(w->gps, w->ops), w->ops > 0);
	json_dbl("gps_per_sec", per(w->gps, w->secs), w->secs > 0);
	json_u64("freed", c1->freed - c0->freed);
	json_u64("lat_samples", w->lat_n);
	json_dbl("lat_p50_us", w->p50, w->lat_n > 0);
	json_dbl("lat_p99_us", w->p99, w->lat_n > 0);
	json_s64("peak_pending", ctx.peak_pending);
	json_u64("maps_freed", c1->maps_freed - c0->maps_freed);
	json_u64("map_samples", w->map_n);
	json_dbl("map_close_p50_us", w->m50, w->map_n > 0);
	json_dbl("map_close_p99_us", w->m99, w->map_n > 0);
	json_s64("selem_bytes", ctx.selem_size);
	json_s64("storage_bytes", ctx.storage_size);
	if (ctx.start.eng_ok && ctx.end.eng_ok) {
		json_open("engine");
		json_dbl("gps_per_op",
			 per(e1->selem.gps - e0->selem.gps + e1->storage.gps - e0->storage.gps,
			     w->ops), w->ops > 0);
		json_s64("peak_pending", ctx.peak_eng_objs);
		json_s64("peak_pending_bytes", ctx.peak_eng_bytes);
		json_s64("peak_pending_first_half", ctx.peak_eng_half[0]);
		json_s64("peak_pending_second_half", ctx.peak_eng_half[1]);
		json_eng("selem", &e1->selem, &e0->selem);
		json_eng("storage", &e1->storage, &e0->storage);
		json_close();
	} else {
		json_key("engine");
		printf("null");
	}
	json_close();
	printf("\n");
}

static void report_final(struct bench_res res[], int res_cnt)
{
	struct window w = { .secs = ctx.window_ns / 1e9 };
	int i;

	for (i = 0; i < res_cnt; i++)
		w.mean += res[i].hits / (0.0 + res_cnt);
	for (i = 0; i < res_cnt && res_cnt > 1; i++)
		w.sd += (res[i].hits - w.mean) * (res[i].hits - w.mean) / (res_cnt - 1.0);
	w.sd = sqrt(w.sd);

	w.ops = ops_of(&ctx.end.c, ctx.end.user_ops) - ops_of(&ctx.start.c, ctx.start.user_ops);
	w.srcu = ctx.end.c.srcu_calls - ctx.start.c.srcu_calls;
	/*
	 * The counter sits above the two state bits of srcu_gp_seq, which
	 * starts near ULONG_MAX (SRCU_GP_SEQ_INITIAL_VAL) and wraps: subtract
	 * first, modulo 2^64, then drop the state bits.
	 */
	w.gps = (ctx.end.gp_seq - ctx.start.gp_seq) >> 2;
	w.p50 = hist_pct_us(ctx.hist_end, ctx.hist_start, 0.50, &w.lat_n);
	w.p99 = hist_pct_us(ctx.hist_end, ctx.hist_start, 0.99, &w.lat_n);
	w.m50 = hist_pct_us(ctx.map_hist_end, ctx.map_hist_start, 0.50, &w.map_n);
	w.m99 = hist_pct_us(ctx.map_hist_end, ctx.map_hist_start, 0.99, &w.map_n);
	print_summary(&w);
	print_json(&w);
}

static void validate_delete(void)
{
	ctx.wl = WL_DELETE;
	ctx.name = "ls-defer-delete";
	validate();
}

static void validate_update(void)
{
	ctx.wl = WL_UPDATE;
	ctx.name = "ls-defer-update";
	validate();
}

static void validate_nmi(void)
{
	ctx.wl = WL_NMI;
	ctx.name = "ls-defer-nmi-delete";
	validate();
}

static void validate_exit(void)
{
	ctx.wl = WL_EXIT;
	ctx.name = "ls-defer-exit";
	validate();
}

static void validate_map_churn(void)
{
	ctx.wl = WL_MAP_CHURN;
	ctx.name = "ls-defer-map-churn";
	validate();
}

const struct bench bench_local_storage_defer_delete = {
	.name = "ls-defer-delete",
	.argp = &bench_local_storage_defer_argp,
	.validate = validate_delete,
	.setup = setup,
	.producer_thread = producer,
	.measure = measure,
	.report_progress = report_progress,
	.report_final = report_final,
};

const struct bench bench_local_storage_defer_update = {
	.name = "ls-defer-update",
	.argp = &bench_local_storage_defer_argp,
	.validate = validate_update,
	.setup = setup,
	.producer_thread = producer,
	.measure = measure,
	.report_progress = report_progress,
	.report_final = report_final,
};

const struct bench bench_local_storage_defer_nmi = {
	.name = "ls-defer-nmi-delete",
	.argp = &bench_local_storage_defer_argp,
	.validate = validate_nmi,
	.setup = setup,
	.producer_thread = producer,
	.measure = measure,
	.report_progress = report_progress,
	.report_final = report_final,
};

const struct bench bench_local_storage_defer_exit = {
	.name = "ls-defer-exit",
	.argp = &bench_local_storage_defer_argp,
	.validate = validate_exit,
	.setup = setup,
	.producer_thread = producer,
	.measure = measure,
	.report_progress = report_progress,
	.report_final = report_final,
};

const struct bench bench_local_storage_defer_map_churn = {
	.name = "ls-defer-map-churn",
	.argp = &bench_local_storage_defer_argp,
	.validate = validate_map_churn,
	.setup = setup,
	.producer_thread = producer,
	.measure = measure,
	.report_progress = report_progress,
	.report_final = report_final,
};
