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
choose_accel "$image"

rm -rf "$out"
mkdir -p "$out"

# Selftests, when built (scripts/selftests-build.sh): the existing local
# storage tests and ours (on the stock kernel too, where they show what it
# refuses: make compare only counts a test that passes on stock and not on
# ours); TESTS= replaces the list.
# test_progs and its BPF objects are in the build dir's selftests_dir.
write_guest_env "$out" "$obj"
# The kernel's console goes to vng's stderr (--verbose), into console.log with
# the guest script's output: a guest that hangs leaves its boot log, KUnit's
# KTAP and any hung-task, soft-lockup or RCU stall report there.
vm_boot "$image" "$out" "$REPO/scripts/guest/run-tests.sh $out ${TESTS:-}"
