// SPDX-License-Identifier: GPL-2.0

/* Test-only: the engine's KUnit suite raises NMIs through the local APIC. */
#if defined(CONFIG_X86_LOCAL_APIC) && defined(CONFIG_BPF_LOCAL_STORAGE_DEFER_KUNIT_TEST)
#include <asm/apic.h>

__rust_helper void rust_helper___apic_send_IPI_mask(const struct cpumask *mask,
						    int vector)
{
	__apic_send_IPI_mask(mask, vector);
}
#endif
