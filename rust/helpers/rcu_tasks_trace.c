// SPDX-License-Identifier: GPL-2.0

#include <linux/rcupdate_trace.h>

#ifdef CONFIG_TASKS_TRACE_RCU
__rust_helper void rust_helper_rcu_read_lock_trace(void)
{
	rcu_read_lock_trace();
}

__rust_helper void rust_helper_rcu_read_unlock_trace(void)
{
	rcu_read_unlock_trace();
}

__rust_helper void rust_helper_call_rcu_tasks_trace(struct rcu_head *rhp,
						    rcu_callback_t func)
{
	call_rcu_tasks_trace(rhp, func);
}

__rust_helper void rust_helper_synchronize_rcu_tasks_trace(void)
{
	synchronize_rcu_tasks_trace();
}

__rust_helper void rust_helper_rcu_barrier_tasks_trace(void)
{
	rcu_barrier_tasks_trace();
}
#endif
