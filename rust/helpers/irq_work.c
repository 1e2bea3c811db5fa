// SPDX-License-Identifier: GPL-2.0

#include <linux/irq_work.h>

/* Like init_irq_work(), with the IRQ_WORK_INIT_HARD() flags. */
__rust_helper void rust_helper_init_irq_work_hard(struct irq_work *work,
						  void (*func)(struct irq_work *))
{
	*work = IRQ_WORK_INIT_HARD(func);
}

__rust_helper bool rust_helper_irq_work_is_busy(struct irq_work *work)
{
	return irq_work_is_busy(work);
}
