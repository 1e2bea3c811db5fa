// SPDX-License-Identifier: GPL-2.0
/*
 * /init of the initramfs that scripts/run-vm-arm64.sh boots: the built-in
 * KUnit suites have run by the time the kernel starts it. It syncs the
 * kernel log to the console, says so with a marker line the host waits for,
 * and powers the guest off. Static, no libc beyond what -static links.
 */
#include <stdio.h>
#include <sys/reboot.h>
#include <unistd.h>

int main(void)
{
	printf("==> guest: lsdefer-kunit-init: done\n");
	fflush(stdout);
	sync();
	reboot(RB_POWER_OFF);
	return 0;
}
