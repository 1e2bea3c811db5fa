#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Runs INSIDE the guest (started by scripts/run-vm.sh). Built-in KUnit suites
# have already run during boot; save the kernel log, then leave a marker so
# the host knows the guest got this far.
#
# Usage: run-tests.sh OUTDIR
set -euo pipefail
out=${1:?usage: run-tests.sh OUTDIR}

echo "==> guest: $(uname -r), $(nproc) CPUs"
mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug
if [ -d /sys/kernel/debug/kunit ]; then
	echo "==> guest: $(find /sys/kernel/debug/kunit -mindepth 1 -maxdepth 1 -type d | wc -l) KUnit suites registered"
fi
dmesg >"$out/dmesg.txt"
touch "$out/guest-done"
