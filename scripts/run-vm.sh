#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Boot the built kernel with virtme-ng and run scripts/guest/run-tests.sh in
# it. Built-in KUnit suites run during boot; the guest script saves the kernel
# log (and later the selftests' results) into the output directory.
#
# Acceleration: KVM when a probe boot shows it works, TCG otherwise (said
# aloud). ACCEL=kvm|tcg forces one. On the project's machines /dev/kvm exists
# but guests hang in early boot, so expect TCG.
#
# Every boot is bounded by VM_TIMEOUT seconds (default 1200). A hung or
# panicked guest fails; its console log is kept in <out>/console.log.
#
# Usage: [ARCH=..] [BASELINE=1] [SANITIZE=kasan] [ACCEL=..] [VM_TIMEOUT=..]
#        [TESTS=...] scripts/run-vm.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"
# A guest starved by a build on the 2 host cores can hit RCU-stall or
# soft-lockup reports: boots take the harness lock too.
[ "${LSDEFER_LOCKED:-}" = 1 ] || exec "$REPO/scripts/locked.sh" "$0" "$@"
# arm64 guests boot without vng: scripts/run-vm-arm64.sh.
[ "$ARCH" != arm64 ] || exec "$REPO/scripts/run-vm-arm64.sh" "$@"

obj=$(build_dir)
out=$(out_dir)
image=$(boot_image "$obj")
command -v vng >/dev/null || die "vng not found: run 'make setup'"
command -v udevadm >/dev/null || die "vng's script mode needs udev on the host: run 'make setup'"

# probe_kvm: boot the kernel with KVM and no root fs. A working KVM reaches
# the "VFS: Unable to mount root fs" panic in seconds; -no-reboot ends QEMU.
probe_kvm() {
	[ -w /dev/kvm ] || return 1
	timeout -k 5 25 qemu-system-x86_64 -accel kvm -m 256 -smp 1 -nographic \
		-no-reboot -kernel "$image" -append "console=ttyS0 panic=-1" </dev/null 2>&1 |
		grep -q -m1 'Kernel panic\|VFS: Unable to mount root'
}

# The probe result is kept per host boot (it costs up to 25 s when KVM hangs).
accel=${ACCEL:-}
probe_cache=$CACHE/kvm-probe.$(cat /proc/sys/kernel/random/boot_id)
if [ -z "$accel" ] && [ -f "$probe_cache" ]; then
	accel=$(cat "$probe_cache")
	info "KVM probe result of this host boot: $accel ($probe_cache)"
elif [ -z "$accel" ]; then
	if probe_kvm; then accel=kvm; else accel=tcg; fi
	rm -f "$CACHE"/kvm-probe.*
	echo "$accel" >"$probe_cache"
fi
case "$accel" in
kvm) info "accelerator: KVM (probe boot succeeded)" ;;
tcg) info "accelerator: TCG software emulation (KVM ${ACCEL:+not requested}${ACCEL:-probe boot hung or /dev/kvm unusable}); expect a slow guest" ;;
*) die "ACCEL=$accel: use kvm or tcg" ;;
esac

rm -rf "$out"
mkdir -p "$out"

# Selftests, when built (scripts/selftests-build.sh): the existing local
# storage tests and ours (on the stock kernel too, where they show what it
# refuses: make compare only counts a test that passes on stock and not on
# ours); TESTS= replaces the list.
# test_progs and its BPF objects are in the build dir (the selftests' O=).
write_guest_env "$out" "$obj"
# The kernel's console goes to vng's stderr (--verbose), into console.log with
# the guest script's output: a guest that hangs leaves its boot log, KUnit's
# KTAP and any hung-task, soft-lockup or RCU stall report there.
cmdline="log_buf_len=16M"
# KASAN on x86_64 with 5-level paging (QEMU's TCG CPU has LA57): while
# identify_cpu() re-reads the boot CPU's capabilities, with interrupts on, the
# LA57 bit is clear, pgtable_l5_enabled() says no, KASAN's shadow start moves
# and an interrupt then reports a wild-memory-access on its irq_desc (7.3.4,
# at 0.006 s, before any of our code runs). Boot with 4-level paging.
if [ "$SANITIZE" = kasan ] && [ "$ARCH" = x86_64 ]; then
	info "KASAN: booting with no5lvl (7.3's early-boot LA57 false report)"
	cmdline+=" no5lvl"
fi
cpus=$(vm_cpus)
vngargs=(--run "$image" --verbose --cpus "$cpus" --memory "${VM_MEM:-2G}"
	--rwdir "$out" --cwd "$REPO"
	--append "$cmdline")
[ "$accel" = tcg ] && vngargs+=(--disable-kvm)

info "booting $image (timeout ${VM_TIMEOUT:-1200}s); console: $out/console.log"
start=$(date +%s)
rc=0
# vng must not write straight into a file (QEMU reopens fd 1/2): pipe it.
timeout -k 10 "${VM_TIMEOUT:-1200}" vng "${vngargs[@]}" \
	--exec "$REPO/scripts/guest/run-tests.sh $out ${TESTS:-}" </dev/null 2>&1 |
	tee "$out/console.log" | sed -u 's/^/    | /' | grep --line-buffered -E '^    \| (==>|#|ok|not ok|error)' || true
rc=${PIPESTATUS[0]}
took=$(($(date +%s) - start))
echo "$took" >"$out/boot-secs"
echo "$accel" >"$out/accel"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
	last_kernel_lines "$out"
	die "guest timed out after ${took}s (console log: $out/console.log)"
fi
if [ ! -f "$out/guest-done" ]; then
	last_kernel_lines "$out"
	die "guest did not finish its script (exit $rc after ${took}s; panic or crash?): see $out/console.log"
fi
info "guest finished in ${took}s"
