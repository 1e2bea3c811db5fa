#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Runs INSIDE the guest: started by scripts/run-vm.sh (x86_64, under bash) or
# by scripts/guest/arm64-init.sh (arm64, under busybox sh): keep it POSIX sh
# plus pipefail, with tools busybox has. Built-in KUnit suites
# have already run during boot. Then, if the host prepared them (OUTDIR/guest.env
# sets SELFTESTS_DIR, TEST_PROGS_ALLOW, TEST_MAPS, KMODS):
#   - load our test modules (KMODS),
#   - run test_progs -v -a "$TEST_PROGS_ALLOW" -J OUTDIR/test_progs.json,
#   - run test_maps: TEST_MAPS=<map test> only that one (TEST_MAPS_ONLY, the
#     harness's fixup), all: every map test, 0: none.
# The kernel log is saved last (OUTDIR/dmesg.txt), so splats from the
# selftests are in it; OUTDIR/guest-done tells the host the script finished.
# A test program still running when the kernel's uptime reaches HANG_AT
# seconds (guest.env; the host sets it short of its own timeout) is reported:
# a "==> guest: hang" line, then the kernel's list of blocked tasks and of
# held locks (sysrq w, d) on the console, which the host keeps when it cuts
# the guest.
#
# Usage: run-tests.sh OUTDIR
set -euo pipefail
out=${1:?usage: run-tests.sh OUTDIR}
SELFTESTS_DIR='' TEST_PROGS_ALLOW='' TEST_MAPS=0 KMODS='' HANG_AT=0
# shellcheck disable=SC1091
[ -f "$out/guest.env" ] && . "$out/guest.env"

# busybox has no mountpoint(1)
mounted() {
	grep -q "^[^ ]* $1 " /proc/mounts
}

# bounded LOG CMD...: runs CMD in the background, its output into LOG, and
# waits for it; if it still runs at uptime HANG_AT (0: no bound), says so and
# dumps the blocked tasks and held locks into the kernel log. Returns CMD's
# status.
bounded() {
	log=$1
	shift
	"$@" >"$log" 2>&1 &
	pid=$!
	watcher=''
	if [ "$HANG_AT" -gt 0 ]; then
		(
			left=$((HANG_AT - $(cut -d. -f1 /proc/uptime)))
			[ "$left" -le 0 ] || sleep "$left"
			kill -0 "$pid" 2>/dev/null || exit 0
			echo "==> guest: hang: $(basename "$log" .log) still running at uptime ${HANG_AT}s; blocked tasks and held locks follow (sysrq w, d)"
			echo w >/proc/sysrq-trigger
			echo d >/proc/sysrq-trigger
		) &
		watcher=$!
	fi
	brc=0
	wait "$pid" || brc=$?
	if [ -n "$watcher" ]; then
		kill "$watcher" 2>/dev/null || true
		wait "$watcher" 2>/dev/null || true
	fi
	return "$brc"
}

echo "==> guest: $(uname -r), $(nproc) CPUs"
mounted /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug
if [ -d /sys/kernel/debug/kunit ]; then
	echo "==> guest: $(find /sys/kernel/debug/kunit -mindepth 1 -maxdepth 1 -type d | wc -l) KUnit suites ran at boot"
fi
dmesg >"$out/dmesg-boot.txt"

if [ -n "$SELFTESTS_DIR" ]; then
	mounted /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
	mounted /sys/kernel/tracing || mount -t tracefs none /sys/kernel/tracing
	# Under TCG perf lowers its sample rate limit each time an emulated
	# interrupt takes long, down to where the test module's PMU NMIs (arm64)
	# get throttled; a throttled counter restarts at its CPU's next tick,
	# which does not come while ls_defer_nmi/create_error holds a lock with
	# interrupts off, and the NMI it waits for is lost. The default limit
	# back, then no lowering (perf refuses a new limit once that is off).
	echo 100000 >/proc/sys/kernel/perf_event_max_sample_rate
	echo 0 >/proc/sys/kernel/perf_cpu_time_max_percent
	for m in $KMODS; do
		echo "==> guest: insmod $(basename "$m")"
		insmod "$m"
	done
	cd "$SELFTESTS_DIR"
	if [ -n "$TEST_PROGS_ALLOW" ]; then
		echo "==> guest: test_progs -a $TEST_PROGS_ALLOW"
		start=$(date +%s)
		rc=0
		# -v: every test's own output is kept, passing ones too
		bounded "$out/test_progs.log" ./test_progs -v -a "$TEST_PROGS_ALLOW" \
			-J "$out/test_progs.json" || rc=$?
		grep -E '^(#[0-9]|Summary)' "$out/test_progs.log" || true
		echo "==> guest: test_progs exit $rc after $(($(date +%s) - start))s"
	fi
	if [ "$TEST_MAPS" != 0 ]; then
		echo "==> guest: test_maps ($TEST_MAPS)"
		start=$(date +%s)
		rc=0
		if [ "$TEST_MAPS" = all ]; then
			bounded "$out/test_maps.log" ./test_maps || rc=$?
		else
			bounded "$out/test_maps.log" env TEST_MAPS_ONLY="$TEST_MAPS" ./test_maps || rc=$?
		fi
		echo "$rc" >"$out/test_maps.rc"
		tail -n 3 "$out/test_maps.log"
		echo "==> guest: test_maps exit $rc after $(($(date +%s) - start))s"
	fi
fi

dmesg >"$out/dmesg.txt"
touch "$out/guest-done"
