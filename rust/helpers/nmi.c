// SPDX-License-Identifier: GPL-2.0

/*
 * Test-only: the engine's KUnit suite raises NMIs through the local APIC on
 * x86 and takes PMU overflow pseudo-NMIs on arm64, whose handler checks
 * in_nmi().
 */
#if defined(CONFIG_BPF_LOCAL_STORAGE_DEFER_KUNIT_TEST)
#include <linux/preempt.h>

__rust_helper bool rust_helper_in_nmi(void)
{
	return in_nmi();
}
#endif

#if defined(CONFIG_X86_LOCAL_APIC) && defined(CONFIG_BPF_LOCAL_STORAGE_DEFER_KUNIT_TEST)
#include <asm/apic.h>

__rust_helper void rust_helper___apic_send_IPI_mask(const struct cpumask *mask,
						    int vector)
{
	__apic_send_IPI_mask(mask, vector);
}
#endif
