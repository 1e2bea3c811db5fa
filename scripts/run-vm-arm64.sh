#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Boot the arm64 kernel under qemu-system-aarch64 (virt, GICv3, TCG: the host
# is x86_64) with an initramfs whose /init only powers off: the built-in KUnit
# suites run during boot, and their KTAP is in the console log. No BPF
# selftests yet: they need an arm64 root filesystem for vng --root.
#
# Pseudo-NMI (ARM64_PSEUDO_NMI, irqchip.gicv3_pseudo_nmi=1) is on, so the
# engine's NMI paths are those of a real arm64 machine.
#
# Usage: ARCH=arm64 [BASELINE=1] [VM_TIMEOUT=..] scripts/run-vm-arm64.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"
[ "${LSDEFER_LOCKED:-}" = 1 ] || exec "$REPO/scripts/locked.sh" "$0" "$@"
[ "$ARCH" = arm64 ] || die "run-vm-arm64.sh: ARCH=$ARCH, want arm64"

obj=$(build_dir)
out=$(out_dir)
image=$(boot_image "$obj")
[ -x "$obj/usr/gen_init_cpio" ] || die "no $obj/usr/gen_init_cpio (CONFIG_BLK_DEV_INITRD off?)"
command -v qemu-system-aarch64 >/dev/null || die "qemu-system-aarch64 not found: run 'make setup'"
command -v "${CROSS_COMPILE}gcc" >/dev/null || die "${CROSS_COMPILE}gcc not found: run 'make setup'"

rm -rf "$out"
mkdir -p "$out"

# The initramfs: /dev/console and a static /init, rebuilt when its source changes.
initdir=$obj/lsdefer-init
mkdir -p "$initdir"
if [ ! -f "$initdir/init" ] || [ "$REPO/scripts/guest/kunit-init.c" -nt "$initdir/init" ]; then
	"${CROSS_COMPILE}gcc" -static -O2 -Wall -Werror -o "$initdir/init" \
		"$REPO/scripts/guest/kunit-init.c" || die "building the guest's /init failed"
fi
cat >"$initdir/list" <<-LIST
	dir /dev 755 0 0
	nod /dev/console 600 0 0 c 5 1
	file /init $initdir/init 755 0 0
LIST
"$obj/usr/gen_init_cpio" "$initdir/list" >"$initdir/initramfs.cpio" ||
	die "gen_init_cpio failed"

info "accelerator: TCG software emulation (arm64 guest on an x86_64 host); expect a slow guest"
info "ARCH=arm64: KUnit only (the BPF selftests need an arm64 root filesystem, not set up yet)"
info "booting $image (timeout ${VM_TIMEOUT:-1200}s); console: $out/console.log"
start=$(date +%s)
rc=0
timeout -k 10 "${VM_TIMEOUT:-1200}" qemu-system-aarch64 \
	-M virt,gic-version=3 -cpu max,pauth-impdef=on -smp "${VM_CPUS:-2}" -m "${VM_MEM:-2G}" \
	-nographic -no-reboot -kernel "$image" -initrd "$initdir/initramfs.cpio" \
	-append "console=ttyAMA0 irqchip.gicv3_pseudo_nmi=1 panic=-1 log_buf_len=16M" \
	</dev/null 2>&1 | tee "$out/console.log" | sed -u 's/^/    | /' |
	grep --line-buffered -E '^    \| (==>|.*# Subtest|.*not ok|.*ok [0-9]+ [a-z])' || true
rc=${PIPESTATUS[0]}
took=$(($(date +%s) - start))
echo "$took" >"$out/boot-secs"
echo tcg >"$out/accel"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
	die "guest timed out after ${took}s (console log: $out/console.log)"
fi
# The console carries the kernel log: report.py reads it as dmesg.
tr -d '\r' <"$out/console.log" >"$out/dmesg.txt"
grep -q '^==> guest: lsdefer-kunit-init: done' "$out/dmesg.txt" ||
	die "guest did not reach its /init (exit $rc after ${took}s; panic or crash?): see $out/console.log"
touch "$out/guest-done"
info "guest finished in ${took}s"
