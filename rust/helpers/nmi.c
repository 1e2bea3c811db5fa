// SPDX-License-Identifier: GPL-2.0

#ifdef CONFIG_X86_LOCAL_APIC
#include <asm/apic.h>

__rust_helper void rust_helper___apic_send_IPI_mask(const struct cpumask *mask,
						    int vector)
{
	__apic_send_IPI_mask(mask, vector);
}
#endif
