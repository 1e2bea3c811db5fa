// SPDX-License-Identifier: GPL-2.0

#include <linux/cpumask.h>
#include <linux/percpu.h>
#include <linux/preempt.h>

__rust_helper void __percpu *rust_helper___alloc_percpu(size_t size, size_t align)
{
	return __alloc_percpu(size, align);
}

__rust_helper void *rust_helper_per_cpu_ptr(void __percpu *ptr, unsigned int cpu)
{
	return per_cpu_ptr(ptr, cpu);
}

__rust_helper bool rust_helper_cpu_possible(unsigned int cpu)
{
	return cpu_possible(cpu);
}

__rust_helper bool rust_helper_cpu_online(unsigned int cpu)
{
	return cpu_online(cpu);
}

/* Next possible CPU after @n (-1 for the first); nr_cpu_ids when done. */
__rust_helper unsigned int rust_helper_cpumask_next_possible(int n)
{
	return cpumask_next(n, cpu_possible_mask);
}

__rust_helper const struct cpumask *rust_helper_cpumask_of(unsigned int cpu)
{
	return cpumask_of(cpu);
}

__rust_helper const struct cpumask *rust_helper_cpu_online_mask(void)
{
	return cpu_online_mask;
}

__rust_helper void rust_helper_preempt_disable(void)
{
	preempt_disable();
}

__rust_helper void rust_helper_preempt_enable(void)
{
	preempt_enable();
}

__rust_helper bool rust_helper_preemptible(void)
{
	return preemptible();
}
