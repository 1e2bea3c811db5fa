// SPDX-License-Identifier: GPL-2.0
/*
 * Test support for the BPF local storage deferred-free selftests
 * (tools/testing/selftests/bpf/prog_tests/ls_defer_*.c).
 *
 * - struct lsdefer_obj: BPF programs create it with bpf_lsdefer_obj_new() and
 *   store it as a referenced kptr in local storage values. Its destructor,
 *   called by bpf_obj_free_fields() when a value is freed, checks and poisons
 *   it and counts, so tests can tell whether and when every value was freed.
 * - bpf_lsdefer_nmi_target(): called from this module's NMI handler, for
 *   fentry programs. Writing <debugfs>/lsdefer_testmod/nmi raises an NMI on
 *   the writer's CPU; nmi_storm raises a stream of NMIs on another CPU, which
 *   land wherever that CPU happens to be; nmi_locked raises NMIs on the
 *   writer's CPU while it holds the lock of its own task local storage, so
 *   that the NMI programs' creates and deletes take their -EDEADLK error
 *   paths in NMI. x86: an NMI IPI from the local APIC (QEMU TCG has no PMU
 *   there). arm64 with pseudo-NMI: the PMU's overflow interrupt, which the
 *   PMUv3 driver requests as a pseudo-NMI: every online CPU gets a cycle
 *   counter with a short period for the duration of a write, and the armed
 *   CPU's next overflow runs the handler (docs/arm64-nmi.md). Elsewhere, or
 *   when the PMU's interrupt is not an NMI (probed at load, said in dmesg),
 *   the nmi files are missing and the tests that need them skip.
 * - <debugfs>/lsdefer_testmod/stats: the counters of enum lsdefer_counter.
 *
 * Interface: ../bpf/lsdefer_testmod.h.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/atomic.h>
#include <linux/bpf.h>
#include <linux/bpf_local_storage.h>
#include <linux/btf.h>
#include <linux/btf_ids.h>
#include <linux/cfi.h>
#include <linux/cpu.h>
#include <linux/cpumask.h>
#include <linux/debugfs.h>
#include <linux/delay.h>
#include <linux/fs.h>
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/percpu.h>
#include <linux/preempt.h>
#include <linux/random.h>
#include <linux/rcupdate.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <asm/rqspinlock.h>
#ifdef CONFIG_X86_LOCAL_APIC
#include <asm/apic.h>
#include <asm/nmi.h>
#define LSDEFER_HAVE_NMI 1
#elif defined(CONFIG_ARM64_PSEUDO_NMI) && defined(CONFIG_HW_PERF_EVENTS)
#include <linux/perf_event.h>
#define LSDEFER_HAVE_NMI 1
#define LSDEFER_PMU_NMI 1
#endif

#include "../bpf/lsdefer_testmod.h"

static atomic64_t lsdefer_cnt[LSDEFER_CNT_NR];

static void lsdefer_obj_destroy(struct lsdefer_obj *obj, bool dtor)
{
	/*
	 * A second destroy of the same object finds the poison, unless the
	 * memory was reused already; KASAN reports that case.
	 */
	if (cmpxchg(&obj->magic, LSDEFER_OBJ_LIVE, LSDEFER_OBJ_DEAD) !=
	    LSDEFER_OBJ_LIVE) {
		atomic64_inc(&lsdefer_cnt[LSDEFER_CNT_BAD]);
		WARN_ONCE(1, "lsdefer_obj %p destroyed twice or corrupted\n", obj);
		return;
	}
	if (dtor) {
		u64 seq = atomic64_inc_return(&lsdefer_cnt[LSDEFER_CNT_SEQ]);

		atomic64_set(&lsdefer_cnt[LSDEFER_CNT_LAST_DTOR_SEQ], seq);
		atomic64_inc(&lsdefer_cnt[LSDEFER_CNT_DTOR]);
	}
	/* Counted before the free: a reader that sees the count may unload. */
	atomic64_inc(&lsdefer_cnt[LSDEFER_CNT_DESTROYED]);
	kfree_nolock(obj);
}

__bpf_kfunc_start_defs();

/* Any context, NMI included: the programs create objects from NMI. */
__bpf_kfunc struct lsdefer_obj *bpf_lsdefer_obj_new(void)
{
	struct lsdefer_obj *obj;

	obj = kmalloc_nolock(sizeof(*obj), __GFP_ZERO, NUMA_NO_NODE);
	if (!obj)
		return NULL;
	obj->id = atomic64_inc_return(&lsdefer_cnt[LSDEFER_CNT_CREATED]);
	obj->magic = LSDEFER_OBJ_LIVE;
	return obj;
}

__bpf_kfunc void bpf_lsdefer_obj_release(struct lsdefer_obj *obj)
{
	lsdefer_obj_destroy(obj, false);
}

/* Called by bpf_obj_free_fields(): never from NMI, but keep it any-context. */
__bpf_kfunc void bpf_lsdefer_obj_dtor(void *obj)
{
	lsdefer_obj_destroy(obj, true);
}

CFI_NOSEAL(bpf_lsdefer_obj_dtor);

__bpf_kfunc u64 bpf_lsdefer_counter(u32 idx)
{
	if (idx >= LSDEFER_CNT_NR)
		return 0;
	return atomic64_read(&lsdefer_cnt[idx]);
}

/* Ticks the event clock the destructor also ticks: orders program events. */
__bpf_kfunc u64 bpf_lsdefer_seq(void)
{
	return atomic64_inc_return(&lsdefer_cnt[LSDEFER_CNT_SEQ]);
}

__bpf_kfunc u32 bpf_lsdefer_ctx(void)
{
	u32 ctx = 0;

	if (in_nmi())
		ctx |= LSDEFER_CTX_NMI;
	if (in_hardirq())
		ctx |= LSDEFER_CTX_HARDIRQ;
	if (in_serving_softirq())
		ctx |= LSDEFER_CTX_SOFTIRQ;
	return ctx;
}

__bpf_kfunc_end_defs();

BTF_KFUNCS_START(lsdefer_kfunc_ids)
BTF_ID_FLAGS(func, bpf_lsdefer_obj_new, KF_ACQUIRE | KF_RET_NULL)
BTF_ID_FLAGS(func, bpf_lsdefer_obj_release, KF_RELEASE)
BTF_ID_FLAGS(func, bpf_lsdefer_counter)
BTF_ID_FLAGS(func, bpf_lsdefer_seq)
BTF_ID_FLAGS(func, bpf_lsdefer_ctx)
BTF_KFUNCS_END(lsdefer_kfunc_ids)

static const struct btf_kfunc_id_set lsdefer_kfunc_set = {
	.owner = THIS_MODULE,
	.set   = &lsdefer_kfunc_ids,
};

BTF_ID_LIST(lsdefer_dtor_ids)
BTF_ID(struct, lsdefer_obj)
BTF_ID(func, bpf_lsdefer_obj_dtor)

__bpf_hook_start();

/*
 * fentry programs attach here. Called from the NMI handler with in_nmi() as
 * the handler saw it; noinline and noclone so that it stays a traceable
 * function of its own, with this name and prototype in the module's BTF.
 */
noinline __noclone int bpf_lsdefer_nmi_target(int in_nmi)
{
	barrier();
	return in_nmi;
}

__bpf_hook_end();

#ifdef LSDEFER_HAVE_NMI
/* Set by whoever raises an NMI on this CPU, cleared by the handler. */
static DEFINE_PER_CPU(int, lsdefer_nmi_armed);
/* One NMI raiser at a time: tests are serial, this keeps them honest. */
static DEFINE_MUTEX(lsdefer_nmi_lock);

/* The armed NMI's work on this CPU, if one is armed here. */
static bool lsdefer_nmi_run(void)
{
	if (!this_cpu_read(lsdefer_nmi_armed))
		return false;
	bpf_lsdefer_nmi_target(!!in_nmi());
	atomic64_inc(&lsdefer_cnt[LSDEFER_CNT_NMI]);
	/* Pairs with the acquire in lsdefer_raise_nmi(): the run is counted. */
	smp_store_release(this_cpu_ptr(&lsdefer_nmi_armed), 0);
	return true;
}

#ifndef LSDEFER_PMU_NMI
static int lsdefer_nmi_handler(unsigned int cmd, struct pt_regs *regs)
{
	return lsdefer_nmi_run() ? NMI_HANDLED : NMI_DONE;
}

static void lsdefer_send_nmi(unsigned int cpu)
{
	__apic_send_IPI_mask(cpumask_of(cpu), NMI_VECTOR);
}

/* NMI IPIs need nothing prepared. */
static int lsdefer_nmi_get(void)
{
	return 0;
}

static void lsdefer_nmi_put(void)
{
}

static int lsdefer_nmi_setup(void)
{
	return register_nmi_handler(NMI_LOCAL, lsdefer_nmi_handler, 0,
				    LSDEFER_MOD_NAME);
}

static void lsdefer_nmi_teardown(void)
{
	/* Waits for a running handler (synchronize_rcu()). */
	unregister_nmi_handler(NMI_LOCAL, LSDEFER_MOD_NAME);
}
#else /* LSDEFER_PMU_NMI */
/*
 * Cycles between two overflows of a CPU's counter: the latency of a raised
 * NMI. QEMU's TCG PMU counts 1 GHz of virtual time (0.5 ms); real cores a
 * few times faster. Up to 2000 NMIs a second a CPU while a write runs, far
 * below perf's default max sample rate (100000).
 */
#define LSDEFER_PMU_PERIOD	500000

static DEFINE_PER_CPU(struct perf_event *, lsdefer_pmu_event);

static struct perf_event_attr lsdefer_pmu_attr = {
	.type		= PERF_TYPE_HARDWARE,
	.config		= PERF_COUNT_HW_CPU_CYCLES,
	.size		= sizeof(struct perf_event_attr),
	.sample_period	= LSDEFER_PMU_PERIOD,
	.pinned		= 1,
};

/* PMU overflow interrupt: a pseudo-NMI (lsdefer_nmi_setup() checked). */
static void lsdefer_pmu_overflow(struct perf_event *event,
				 struct perf_sample_data *data,
				 struct pt_regs *regs)
{
	if (in_nmi())
		lsdefer_nmi_run();
}

/* The armed CPU's counter overflows within LSDEFER_PMU_PERIOD cycles. */
static void lsdefer_send_nmi(unsigned int cpu)
{
}

static void lsdefer_nmi_put(void)
{
	unsigned int cpu;

	for_each_possible_cpu(cpu) {
		struct perf_event *event = per_cpu(lsdefer_pmu_event, cpu);

		if (event) {
			perf_event_release_kernel(event);
			per_cpu(lsdefer_pmu_event, cpu) = NULL;
		}
	}
}

/*
 * A counter on every online CPU, for the duration of one write. The caller
 * holds cpus_read_lock() until lsdefer_nmi_put().
 */
static int lsdefer_nmi_get(void)
{
	struct perf_event *event;
	unsigned int cpu;

	for_each_online_cpu(cpu) {
		event = perf_event_create_kernel_counter(&lsdefer_pmu_attr, cpu,
							 NULL, lsdefer_pmu_overflow,
							 NULL);
		if (IS_ERR(event)) {
			lsdefer_nmi_put();
			return PTR_ERR(event);
		}
		per_cpu(lsdefer_pmu_event, cpu) = event;
	}
	return 0;
}

static atomic_t lsdefer_probe_nmi, lsdefer_probe_irq;

static void lsdefer_pmu_probe(struct perf_event *event,
			      struct perf_sample_data *data,
			      struct pt_regs *regs)
{
	atomic_inc(in_nmi() ? &lsdefer_probe_nmi : &lsdefer_probe_irq);
}

/*
 * The NMI files exist only if the PMU's overflow interrupt is an NMI here:
 * one counter, on this CPU, for up to a second, tells. Without a PMU, or
 * with its interrupt a plain IRQ (no irqchip.gicv3_pseudo_nmi=1), say why:
 * the tests then skip, they do not pass.
 */
static int lsdefer_nmi_setup(void)
{
	struct perf_event *event;
	int i;

	event = perf_event_create_kernel_counter(&lsdefer_pmu_attr,
						 raw_smp_processor_id(), NULL,
						 lsdefer_pmu_probe, NULL);
	if (IS_ERR(event)) {
		pr_info("no NMI trigger: no PMU cycle counter (%ld)\n",
			PTR_ERR(event));
		return -EOPNOTSUPP;
	}
	for (i = 0; i < 50; i++) {
		if (atomic_read(&lsdefer_probe_nmi) || atomic_read(&lsdefer_probe_irq))
			break;
		msleep(20);
	}
	perf_event_release_kernel(event);
	if (atomic_read(&lsdefer_probe_irq)) {
		pr_info("no NMI trigger: the PMU's overflow interrupt is not an NMI (pseudo-NMI off?)\n");
		return -EOPNOTSUPP;
	}
	if (!atomic_read(&lsdefer_probe_nmi)) {
		pr_info("no NMI trigger: the PMU cycle counter did not overflow in 1 s\n");
		return -EOPNOTSUPP;
	}
	pr_info("NMI trigger: PMU overflow pseudo-NMIs, period %d cycles\n",
		LSDEFER_PMU_PERIOD);
	return 0;
}

static void lsdefer_nmi_teardown(void)
{
}
#endif /* LSDEFER_PMU_NMI */

/*
 * Raise one NMI on @cpu and wait until its handler ran. Preemption is
 * disabled by the caller when @cpu is the current CPU.
 */
static int lsdefer_raise_nmi(unsigned int cpu)
{
	int *armed = per_cpu_ptr(&lsdefer_nmi_armed, cpu);
	u64 deadline = ktime_get_ns() + NSEC_PER_SEC;

	WRITE_ONCE(*armed, 1);
	/* The handler on @cpu must see the flag once the NMI is there. */
	smp_mb();
	lsdefer_send_nmi(cpu);
	/* Pairs with the release in the handler. */
	while (smp_load_acquire(armed)) {
		if (ktime_get_ns() > deadline) {
			/* Lost: a late NMI then finds nothing to do. */
			if (cmpxchg(armed, 1, 0) == 1) {
				atomic64_inc(&lsdefer_cnt[LSDEFER_CNT_NMI_LOST]);
				return -ETIMEDOUT;
			}
			break;
		}
		cpu_relax();
	}
	return 0;
}

static int lsdefer_parse(const char __user *ubuf, size_t len, int *v, int nr)
{
	char buf[64];
	int n;

	if (len >= sizeof(buf))
		return -EINVAL;
	if (copy_from_user(buf, ubuf, len))
		return -EFAULT;
	buf[len] = '\0';
	switch (nr) {
	case 1:
		n = sscanf(buf, "%d", &v[0]);
		break;
	case 3:
		n = sscanf(buf, "%d %d %d", &v[0], &v[1], &v[2]);
		break;
	default:
		return -EINVAL;
	}
	return n == nr ? 0 : -EINVAL;
}

/* write "N": N NMIs on the writer's CPU, each waited for */
static ssize_t lsdefer_nmi_write(struct file *file, const char __user *ubuf,
				 size_t len, loff_t *ppos)
{
	int v[1], i, err;

	err = lsdefer_parse(ubuf, len, v, 1);
	if (err)
		return err;
	if (v[0] <= 0 || v[0] > 1000000)
		return -EINVAL;
	mutex_lock(&lsdefer_nmi_lock);
	cpus_read_lock();
	err = lsdefer_nmi_get();
	for (i = 0; i < v[0] && !err; i++) {
		preempt_disable();
		err = lsdefer_raise_nmi(smp_processor_id());
		preempt_enable();
		cond_resched();
	}
	lsdefer_nmi_put();
	cpus_read_unlock();
	mutex_unlock(&lsdefer_nmi_lock);
	return err ?: len;
}

/*
 * write "CPU N GAP_US": N NMIs on CPU, each waited for, a random 0..GAP_US
 * apart, for at most 20 s. From another CPU they interrupt whatever CPU runs:
 * task context, the middle of a delete, hard interrupts with IRQs disabled.
 */
static ssize_t lsdefer_nmi_storm_write(struct file *file, const char __user *ubuf,
				       size_t len, loff_t *ppos)
{
	u64 deadline = ktime_get_ns() + 20 * NSEC_PER_SEC;
	int v[3], i, err;
	unsigned int cpu;

	err = lsdefer_parse(ubuf, len, v, 3);
	if (err)
		return err;
	if (v[0] < 0 || v[0] >= nr_cpu_ids || v[1] <= 0 || v[1] > 10000000 ||
	    v[2] < 0 || v[2] > 10000)
		return -EINVAL;
	cpu = v[0];

	mutex_lock(&lsdefer_nmi_lock);
	cpus_read_lock();
	if (!cpu_online(cpu)) {
		err = -ENODEV;
		goto out;
	}
	err = lsdefer_nmi_get();
	for (i = 0; i < v[1] && !err; i++) {
		preempt_disable();
		err = lsdefer_raise_nmi(cpu);
		preempt_enable();
		if (v[2])
			udelay(get_random_u32_below(v[2] + 1));
		cond_resched();
		if (fatal_signal_pending(current))
			err = -EINTR;
		else if (ktime_get_ns() > deadline)
			break;
	}
	lsdefer_nmi_put();
out:
	cpus_read_unlock();
	mutex_unlock(&lsdefer_nmi_lock);
	return err ?: len;
}

/*
 * One NMI on this CPU while it holds the lock of current's task local
 * storage. The programs on the NMI hook then get -EDEADLK from rqspinlock's
 * AA check for whatever takes that lock: a create frees its new element,
 * which was never published, from NMI.
 */
static int lsdefer_nmi_locked_one(void)
{
	struct bpf_local_storage *local_storage;
	unsigned long flags;
	int err;

	rcu_read_lock();
	local_storage = rcu_dereference(current->bpf_storage);
	if (!local_storage) {
		err = -ENOENT;
		goto out;
	}
	/* Also disables preemption: the NMI lands on the lock holder. */
	err = raw_res_spin_lock_irqsave(&local_storage->lock, flags);
	if (err)
		goto out;
	err = lsdefer_raise_nmi(smp_processor_id());
	raw_res_spin_unlock_irqrestore(&local_storage->lock, flags);
	if (!err)
		atomic64_inc(&lsdefer_cnt[LSDEFER_CNT_NMI_LOCKED]);
out:
	rcu_read_unlock();
	return err;
}

/*
 * write "N": N NMIs on the writer's CPU, each waited for, each raised while
 * holding the lock of the writer's task local storage (-ENOENT: it has none).
 */
static ssize_t lsdefer_nmi_locked_write(struct file *file, const char __user *ubuf,
					size_t len, loff_t *ppos)
{
	int v[1], i, err;

	err = lsdefer_parse(ubuf, len, v, 1);
	if (err)
		return err;
	if (v[0] <= 0 || v[0] > 1000000)
		return -EINVAL;
	mutex_lock(&lsdefer_nmi_lock);
	cpus_read_lock();
	err = lsdefer_nmi_get();
	for (i = 0; i < v[0] && !err; i++) {
		err = lsdefer_nmi_locked_one();
		cond_resched();
	}
	lsdefer_nmi_put();
	cpus_read_unlock();
	mutex_unlock(&lsdefer_nmi_lock);
	return err ?: len;
}

static const struct file_operations lsdefer_nmi_fops = {
	.owner = THIS_MODULE,
	.write = lsdefer_nmi_write,
	.llseek = noop_llseek,
};

static const struct file_operations lsdefer_nmi_storm_fops = {
	.owner = THIS_MODULE,
	.write = lsdefer_nmi_storm_write,
	.llseek = noop_llseek,
};

static const struct file_operations lsdefer_nmi_locked_fops = {
	.owner = THIS_MODULE,
	.write = lsdefer_nmi_locked_write,
	.llseek = noop_llseek,
};
#endif /* LSDEFER_HAVE_NMI */

static int lsdefer_stats_show(struct seq_file *m, void *v)
{
	int i;

	for (i = 0; i < LSDEFER_CNT_NR; i++)
		seq_printf(m, "%s %lld\n", lsdefer_cnt_names[i],
			   (long long)atomic64_read(&lsdefer_cnt[i]));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(lsdefer_stats);

static struct dentry *lsdefer_dir;

static int __init lsdefer_init(void)
{
	const struct btf_id_dtor_kfunc dtors[] = {
		{
			.btf_id		= lsdefer_dtor_ids[0],
			.kfunc_btf_id	= lsdefer_dtor_ids[1],
		},
	};
	int err;

	err = register_btf_kfunc_id_set(BPF_PROG_TYPE_UNSPEC, &lsdefer_kfunc_set);
	err = err ?: register_btf_id_dtor_kfuncs(dtors, ARRAY_SIZE(dtors),
						 THIS_MODULE);
	if (err)
		return err;

	lsdefer_dir = debugfs_create_dir(LSDEFER_MOD_NAME, NULL);
	debugfs_create_file("stats", 0444, lsdefer_dir, NULL, &lsdefer_stats_fops);
#ifdef LSDEFER_HAVE_NMI
	err = lsdefer_nmi_setup();
#ifdef LSDEFER_PMU_NMI
	/* No NMI trigger here (said why): the module loads, the tests skip. */
	if (err == -EOPNOTSUPP)
		return 0;
#endif
	if (err) {
		debugfs_remove(lsdefer_dir);
		return err;
	}
	debugfs_create_file("nmi", 0200, lsdefer_dir, NULL, &lsdefer_nmi_fops);
	debugfs_create_file("nmi_storm", 0200, lsdefer_dir, NULL,
			    &lsdefer_nmi_storm_fops);
	debugfs_create_file("nmi_locked", 0200, lsdefer_dir, NULL,
			    &lsdefer_nmi_locked_fops);
#endif
	return 0;
}

static void __exit lsdefer_exit(void)
{
	/* Writers hold a reference on the module: none is running. */
	debugfs_remove(lsdefer_dir);
#ifdef LSDEFER_HAVE_NMI
	lsdefer_nmi_teardown();
#endif
}

module_init(lsdefer_init);
module_exit(lsdefer_exit);

MODULE_DESCRIPTION("Test support for the BPF local storage deferred-free selftests");
MODULE_LICENSE("GPL");
