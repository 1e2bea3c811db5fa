#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Boot the arm64 kernel under qemu-system-aarch64 (virt, GICv3, -cpu max,
# TCG: the host is x86_64) and run the same tests as the x86_64 guest.
#
# The guest is an initramfs built here, never downloaded: busybox-static for
# arm64 (ARM64_SYSROOT of scripts/setup.sh, a pinned bookworm package) and
# scripts/guest/arm64-init.sh as /init, which mounts proc, sysfs, devtmpfs,
# debugfs, tracefs, bpffs and cgroup2, brings lo up, mounts three 9p shares
# at their host paths (the repo and the build dir read-only: test_progs,
# test_maps, their BPF objects and test modules, our test module; the output
# dir read-write), runs scripts/guest/run-tests.sh OUT and powers off. The
# outputs are those of the x86_64 guest (dmesg.txt, test_progs.json/.log,
# test_maps.rc/.log, guest-done), so scripts/report.py reads both alike.
# Without selftests (SELFTESTS=0, or not built) the run is KUnit only.
#
# Pseudo-NMI (ARM64_PSEUDO_NMI, irqchip.gicv3_pseudo_nmi=1) is on: the PMU's
# overflow interrupt is a pseudo-NMI, which the test module and the engine's
# KUnit use to raise NMIs (docs/arm64-nmi.md). VM_APPEND is appended to the
# kernel command line: VM_APPEND=irqchip.gicv3_pseudo_nmi=0 turns them off,
# and the NMI tests then say SKIP with the reason.
#
# Every boot is bounded by VM_TIMEOUT seconds (default 1200). A hung or
# panicked guest fails; its console log is kept in <out>/console.log.
#
# Usage: ARCH=arm64 [BASELINE=1] [VM_TIMEOUT=..] [VM_CPUS=..] [TESTS=...]
#        [SELFTESTS=0] [VM_APPEND=..] scripts/run-vm-arm64.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"
[ "${LSDEFER_LOCKED:-}" = 1 ] || exec "$REPO/scripts/locked.sh" "$0" "$@"
[ "$ARCH" = arm64 ] || die "run-vm-arm64.sh: ARCH=$ARCH, want arm64"

obj=$(build_dir)
out=$(out_dir)
image=$(boot_image "$obj")
cpus=$(vm_cpus)
busybox=$ARM64_SYSROOT/bin/busybox
[ -x "$obj/usr/gen_init_cpio" ] || die "no $obj/usr/gen_init_cpio (CONFIG_BLK_DEV_INITRD off?)"
command -v qemu-system-aarch64 >/dev/null || die "qemu-system-aarch64 not found: run 'make setup'"
[ -x "$busybox" ] || die "no arm64 busybox at $busybox: run 'make setup'"
[ -x "$ARM64_SYSROOT/bin/rm" ] || die "no arm64 rm at $ARM64_SYSROOT/bin/rm: run 'make setup'"
[ -f "$ARM64_CROSS_LIBC/libc.so.6" ] || die "no $ARM64_CROSS_LIBC/libc.so.6: run 'make setup' (libc6-dev-arm64-cross)"

rm -rf "$out"
mkdir -p "$out"
write_guest_env "$out" "$obj"

# The initramfs: small (busybox, /init, the paths); rebuilt for every run.
# Also coreutils' rm, dynamic, with the cross toolchain's glibc (bookworm's
# 2.36, as coreutils was built against): test_local_storage copies /bin/rm
# and runs the copy, which a busybox applet link cannot be.
initdir=$obj/lsdefer-init
mkdir -p "$initdir"
cat >"$initdir/lsdefer.env" <<-ENV
	REPO='$REPO'
	OBJ='$obj'
	OUT='$out'
	TESTS='${TESTS:-}'
ENV
cat >"$initdir/list" <<-LIST
	dir /dev 755 0 0
	nod /dev/console 600 0 0 c 5 1
	dir /bin 755 0 0
	file /bin/busybox $busybox 755 0 0
	slink /bin/sh busybox 777 0 0
	file /bin/rm $ARM64_SYSROOT/bin/rm 755 0 0
	dir /lib 755 0 0
	dir /lib/aarch64-linux-gnu 755 0 0
	file /lib/ld-linux-aarch64.so.1 $ARM64_CROSS_LIBC/ld-linux-aarch64.so.1 755 0 0
	file /lib/aarch64-linux-gnu/libc.so.6 $ARM64_CROSS_LIBC/libc.so.6 755 0 0
	file /init $REPO/scripts/guest/arm64-init.sh 755 0 0
	file /lsdefer.env $initdir/lsdefer.env 644 0 0
LIST
"$obj/usr/gen_init_cpio" "$initdir/list" >"$initdir/initramfs.cpio" ||
	die "gen_init_cpio failed"

# 9p shares, mounted by arm64-init.sh by tag at the same paths.
share() {
	local tag=$1 path=$2 ro=$3
	printf '%s\n' -fsdev "local,id=$tag,path=$path,security_model=none${ro:+,readonly=on}" \
		-device "virtio-9p-pci,fsdev=$tag,mount_tag=$tag"
}
mapfile -t shares < <(share repo "$REPO" 1; share obj "$obj" 1; share out "$out" "")

info "accelerator: TCG software emulation (arm64 guest on an x86_64 host); expect a slow guest"
info "booting $image (timeout ${VM_TIMEOUT:-1200}s); console: $out/console.log"
vm_run "$out" tcg qemu-system-aarch64 \
	-M virt,gic-version=3 -cpu max,pauth-impdef=on -smp "$cpus" -m "${VM_MEM:-2G}" \
	-nographic -no-reboot -kernel "$image" -initrd "$initdir/initramfs.cpio" \
	-append "console=ttyAMA0 irqchip.gicv3_pseudo_nmi=1 panic=-1 log_buf_len=16M${VM_APPEND:+ $VM_APPEND}" \
	"${shares[@]}"
