// SPDX-License-Identifier: GPL-2.0

/* Test-only: the engine's KUnit suite produces with bottom halves disabled. */
#ifdef CONFIG_BPF_LOCAL_STORAGE_DEFER_KUNIT_TEST
#include <linux/bottom_half.h>

__rust_helper void rust_helper_local_bh_disable(void)
{
	local_bh_disable();
}

__rust_helper void rust_helper_local_bh_enable(void)
{
	local_bh_enable();
}
#endif
