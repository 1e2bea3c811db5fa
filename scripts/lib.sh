# SPDX-License-Identifier: GPL-2.0
# shellcheck shell=bash disable=SC2034
#
# Common definitions for the harness scripts: pinned versions, cache layout,
# messages. Sourced, never executed.
#
# Environment understood by every script:
#   LSDEFER_CACHE  cache root (default: ~/.cache/lsdefer); toolchain, kernel
#                  source, harness-owned trees and build dirs live here.
#   ARCH           x86_64 (default) or arm64.
#   KDIR           optional: a kernel tree to use instead of the pinned Debian
#                  linux-source package. It is copied, never modified.
#   BASELINE       1: build the same config without our overlay (stock kernel).
#   SANITIZE       "" or kasan (KASAN with LLVM=-19, needed when Rust is on).
#   BROKEN         n: also apply selftests/broken/broken-<n>*.patch (on purpose).

# Pinned versions. Changing one of these is a deliberate, reviewed edit.
LINUX_SRC_PKG=linux-source-7.3
LINUX_SRC_VER=7.3.4-1~bpo13+1
LINUX_SRC_SHA256=703e369ddd4cce971452f5a593ee55df3a5c10c83caf0fa0df039633ed181ee3
RUSTC_WANT=1.95.0
RUST_SRC_VER=1.95.0+dfsg1-2~bpo13+1
RUST_SRC_SHA256=7b76db5b880a77f9e52975d2baa6209d2f76d2c9c2789515c3088cb960e2c83b
BINDGEN_VER=0.72.1
VNG_VER=1.42
LLVM_VER=19
# arm64 user space for the guest and the cross-built selftests: Debian
# bookworm arm64 packages, "name version sha256" (apt-get download through a
# private apt state for arm64, sha256-checked, dpkg -x into ARM64_SYSROOT).
# libssl: the selftests build sign-file and a target bpftool, which link
# libcrypto. busybox-static: the guest's shell and tools.
ARM64_DEBS=(
	"libelf-dev 0.188-2.1 fe16ede10e1b80a2f882f0e83c52695e77280c61eebe7106f016d4025e82399b"
	"libelf1 0.188-2.1 32971952d8f5d563447bf275f24e26057500924da2d855c1edb53b0f0400bd11"
	"zlib1g-dev 1:1.2.13.dfsg-1 afb60f0bae432f2f0edfe2d674e99c1a13a147c9aa2b52f2f23e3df19ece76f5"
	"zlib1g 1:1.2.13.dfsg-1 52b8b8a145bbe1956bba82034f77022cbef0c3d0885c9e32d9817a7932fe1913"
	"libzstd-dev 1.5.4+dfsg2-5+deb12u1 2dc8d2578567d2bd5aea37236f52c75fbaf8adb3f8836dc5d67cad8c565b5cd3"
	"libzstd1 1.5.4+dfsg2-5+deb12u1 2032e10b4dd01ec97d157aa1f6474efd6320bb70c6a7cae003e1b8eba3b566f8"
	"libssl-dev 3.0.22-1~deb12u2 d141686eacc7e271630bf9032cd19cebe984b6864e59c02ac85554ff62941d00"
	"libssl3 3.0.22-1~deb12u2 3d04ecd8d0f57fed50d205abaeedfcc84c1960073ea085719c00add44b0ccd7f"
	"busybox-static 1:1.35.0-4+deb12u1+b1 732c9135564fc71337e0e05fb4da4d11e6c28c1834bce3e405e575afef2a52f5"
	"coreutils 9.1-1 ec8f090a14c684879dce251254d8d9ed0876d4480f750d5807ef04e5435e1c4d"
)

# Host packages pinned by version and sha256, "name version sha256"
# (scripts/setup.sh installs them from the checked file). ccache: the stock
# kernel's C objects are ours (scripts/build.sh). linux-perf: make bench's
# profiles (BENCH_PROFILE), in the guest, which shares the host's root.
HOST_DEBS=(
	"ccache 4.8+really4.7.5-1 d6562e03b90d4bbe299966117aef44975f57bea8270c233b1d71f1e6ba157e7d"
	"linux-perf 6.1.192-3 b305d33042097b18097f546a4958889160bcb47efaef82f52d7a4317ff22dc6e"
)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${LSDEFER_CACHE:-$HOME/.cache/lsdefer}
ARCH=${ARCH:-x86_64}
BASELINE=${BASELINE:-0}
SANITIZE=${SANITIZE:-}

TOOLS=$CACHE/tools
RUST_LIB_SRC=$TOOLS/rust-src-$RUST_SRC_VER/usr/lib/rustlib/src/rust/library
BINDGEN_DIR=$TOOLS/bindgen-$BINDGEN_VER/bin
VNG_VENV=$TOOLS/vng-$VNG_VER
# Keyed by the pinned list: a changed pin unpacks a fresh sysroot.
ARM64_SYSROOT=$TOOLS/arm64-sysroot-$(printf '%s\n' "${ARM64_DEBS[@]}" | sha256sum | cut -c1-12)
ARM64_LIBDIR=$ARM64_SYSROOT/usr/lib/aarch64-linux-gnu
# The cross toolchain's arm64 glibc (libc6-arm64-cross), for the guest's rm.
ARM64_CROSS_LIBC=/usr/aarch64-linux-gnu/lib
export RUST_LIB_SRC
export LIBCLANG_PATH=/usr/lib/llvm-$LLVM_VER/lib
export PATH=$BINDGEN_DIR:$VNG_VENV/bin:$HOME/.cargo/bin:$PATH

die() {
	echo "error: $*" >&2
	exit 1
}

info() {
	echo "==> $*"
}

# Kernel ARCH name and cross compiler for the selected guest architecture.
case "$ARCH" in
x86_64)
	KARCH=x86
	CROSS_COMPILE=
	KIMAGE=arch/x86/boot/bzImage
	;;
arm64 | aarch64)
	ARCH=arm64
	KARCH=arm64
	CROSS_COMPILE=aarch64-linux-gnu-
	KIMAGE=arch/arm64/boot/Image
	;;
*)
	die "unsupported ARCH=$ARCH (use x86_64 or arm64)"
	;;
esac

case "$SANITIZE" in
"" | kasan) ;;
*) die "unsupported SANITIZE=$SANITIZE (use kasan or leave it empty)" ;;
esac

# Extra make variables for the kernel build. KASAN with Rust needs clang.
kmake_vars() {
	# CLIPPY=1: every Rust object is compiled by clippy-driver, so clippy runs
	# on each build and scripts/build.sh fails on its warnings in our files.
	# KBUILD_BUILD_TIMESTAMP (the source's date): a reproducible build, which
	# also makes scripts/Makefile.btf run pahole 1.24 without -j, whose BTF
	# type order differs from link to link. With -j, every relink (an edit of
	# the engine) changed vmlinux.h and rebuilt all the BPF selftests.
	# CC through ccache (CCACHE_* below): see build_dir.
	local -a v=("ARCH=$KARCH" CLIPPY=1
		"KBUILD_BUILD_TIMESTAMP=$(date -u -r "$(pristine_dir)/Makefile" '+%Y-%m-%d %H:%M:%S UTC')")
	if [ "$SANITIZE" = kasan ]; then
		v+=("LLVM=-$LLVM_VER" "CC=ccache clang-$LLVM_VER")
	else
		v+=("CC=ccache ${CROSS_COMPILE}gcc")
		[ -z "$CROSS_COMPILE" ] || v+=("CROSS_COMPILE=$CROSS_COMPILE")
	fi
	printf '%s\n' "${v[@]}"
}

# ccache for the kernel's C objects, in the cache; the cwd (the build dir,
# which differs between flavours) is left out of the hash (NOHASHDIR): only
# DW_AT_comp_dir of a shared object names the other flavour's build dir.
export CCACHE_DIR=$CACHE/ccache
export CCACHE_NOHASHDIR=1
export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-16G}

# Identity of the kernel source: the pinned package, or a hash of KDIR's path.
src_id() {
	if [ -n "${KDIR:-}" ]; then
		echo "kdir-$(realpath "$KDIR" | sha256sum | cut -c1-12)"
	else
		echo "deb-$LINUX_SRC_VER" | tr '~+' '__'
	fi
}

# Pristine source: never written to.
pristine_dir() {
	if [ -n "${KDIR:-}" ]; then
		realpath "$KDIR"
	else
		echo "$CACHE/src/$LINUX_SRC_PKG-$LINUX_SRC_VER/$LINUX_SRC_PKG"
	fi
}

# Harness-owned tree (a copy of the pristine source plus, unless BASELINE=1,
# our overlay).
flavour() {
	if [ "$BASELINE" = 1 ]; then echo baseline; else echo lsdefer; fi
}

tree_dir() {
	echo "$CACHE/trees/$(src_id)-$(flavour)"
}

# make targets that give the base .config, before the fragments: arm64's
# defconfig builds every SoC platform's drivers, hundreds of them as modules;
# mod2noconfig turns every module off (the fragments turn back on the few
# they ask for as =m), and qemu/config.arm64 turns the platforms off.
config_base_targets() {
	case "$ARCH" in
	arm64) echo defconfig mod2noconfig ;;
	*) echo defconfig ;;
	esac
}

# Fragments that make up the kernel config, in merge order (later wins).
config_fragments() {
	local t
	t=$(tree_dir)
	echo "$t/tools/testing/selftests/bpf/config"
	echo "$t/tools/testing/selftests/bpf/config.vm"
	echo "$REPO/qemu/config.common"
	echo "$REPO/qemu/config.$ARCH"
	if [ "$BASELINE" != 1 ] && [ -f "$REPO/selftests/kunit/config" ]; then
		echo "$REPO/selftests/kunit/config"
	fi
	if [ -n "$SANITIZE" ]; then
		echo "$REPO/qemu/config.$SANITIZE"
	fi
}

# The kernel image in build dir $1, checked to be of this run's BROKEN
# variant (the build dir is shared by all of them); dies otherwise.
boot_image() {
	local obj=$1 image variant
	image=$obj/$KIMAGE
	[ -f "$image" ] || die "no kernel image at $image: run 'make build ARCH=$ARCH' first"
	variant=$(cat "$obj/.lsdefer-image-variant" 2>/dev/null || echo unknown)
	[ "$variant" = "${BROKEN:-none}" ] ||
		die "the image in $obj was built with BROKEN=$variant, not BROKEN=${BROKEN:-none}: run 'make build' with the same BROKEN first"
	echo "$image"
}

# Build dir keyed by source (kernel version), flavour, arch and sanitizer.
# An edit of a fragment re-runs olddefconfig in the same dir (see
# scripts/configure.sh), so the rebuild stays incremental.
# It is a direct subdirectory of the flavour's tree: Kbuild then names the
# source "..", so every compiler command line and every preprocessed line
# marker is the same in ours and stock's build dirs, and the stock kernel's C
# compiles are ccache hits of ours (except the files our overlay or our two
# config options touch). tree.sh's rsync protects it.
BUILD_SUBDIR=.lsdefer-build
build_dir() {
	echo "$(tree_dir)/$BUILD_SUBDIR-$ARCH${SANITIZE:+-$SANITIZE}"
}

# selftests_dir [OBJ]: the BPF selftests' output (their OUTPUT=; O= stays
# the build dir, for the vmlinux, autoconf.h and test_kmods): a subdirectory
# of the build dir OBJ (default: this run's).
# Not the build dir itself: progs/*.c include "../../../include/linux/filter.h",
# which they mean to find through -I. (tools/include), and which through
# -I$(OUTPUT)/tools/include would resolve to the kernel's own header in the
# tree, the build dir's parent.
selftests_dir() {
	echo "${1:-$(build_dir)}/selftests"
}

kernel_version() {
	make -s -C "$1" kernelversion 2>/dev/null
}

# vCPUs of the guest (VM_CPUS, default 2), checked.
vm_cpus() {
	local cpus=${VM_CPUS:-2}
	[[ "$cpus" =~ ^[1-9][0-9]?$ ]] || die "VM_CPUS=$cpus is not a number of vCPUs (1-99)"
	echo "$cpus"
}

# write_guest_env OUT OBJ: when the selftests are built for the build dir
# OBJ (and not SELFTESTS=0), write OUT/guest.env for
# scripts/guest/run-tests.sh: the local-storage tests and ours (TESTS=
# replaces the list), test_maps' test, our test modules, and the uptime at
# which a test still running is reported as hung with the kernel's blocked
# tasks (a minute before vm_run cuts the guest). Says what it chose.
write_guest_env() {
	local out=$1 obj=$2 st allow kmods maps timeout=${VM_TIMEOUT:-1200} hang_at
	local -a lists=("$REPO/selftests/local-storage.tests" "$REPO/selftests/lsdefer.tests")
	[ "${SELFTESTS:-1}" != 0 ] || return 0
	st=$(selftests_dir "$obj")
	if [ ! -x "$st/test_progs" ]; then
		info "selftests not built ($st/test_progs missing): KUnit only"
		return 0
	fi
	allow=${TESTS:-$(cat "${lists[@]}" 2>/dev/null | grep -v '^#' | grep . | paste -sd, -)}
	kmods=$(find "$obj/lsdefer-kmod" -name '*.ko' 2>/dev/null | sort | tr '\n' ' ')
	# test_maps: its local storage test by default; none when TESTS picks tests
	if [ -n "${TESTS:-}" ]; then
		maps=${TEST_MAPS:-0}
	else
		maps=${TEST_MAPS:-sk_storage_map}
	fi
	[[ "$timeout" =~ ^[1-9][0-9]*$ ]] || die "VM_TIMEOUT=$timeout is not a number of seconds"
	hang_at=$((timeout > 120 ? timeout - 60 : timeout / 2))
	cat >"$out/guest.env" <<-ENV
		SELFTESTS_DIR=$st
		TEST_PROGS_ALLOW=$allow
		TEST_MAPS=$maps
		KMODS="$kmods"
		HANG_AT=$hang_at
	ENV
	info "selftests: test_progs -a $allow${kmods:+ (modules: $kmods)}"
}

# last_kernel_lines OUT: a guest that did not finish: where it stood. When
# the guest reported a hang (run-tests.sh), the blocked tasks it dumped.
last_kernel_lines() {
	local hang
	hang=$(grep -m1 -n '^==> guest: hang: ' "$1/console.log" | cut -d: -f1 || true)
	if [ -n "$hang" ]; then
		echo "the guest reported a hang; blocked tasks in $1/console.log:" >&2
		tail -n +"$hang" "$1/console.log" | grep -E '^(==>|\[ *[0-9]+\.[0-9]+\])' |
			head -n 80 | sed 's/^/    /' >&2 || true
		return 0
	fi
	echo "last kernel lines of $1/console.log:" >&2
	grep -E '^\[ *[0-9]+\.[0-9]+\]' "$1/console.log" | tail -n 25 | sed 's/^/    /' >&2 || true
}

# Guest outputs of one run.
out_dir() {
	echo "${OUT:-$REPO/out}/$ARCH-$(flavour)${SANITIZE:+-$SANITIZE}${BROKEN:+-broken-$BROKEN}${VM_CPUS:+-${VM_CPUS}cpus}"
}

# choose_accel IMAGE: the accelerator for booting IMAGE: ACCEL if set, else
# this host boot's cached probe result, else a probe boot (KVM works if the
# kernel reaches its "no root fs" panic within 25 s). Sets VM_ACCEL and says
# which. On the project's machines /dev/kvm exists but guests hang in early
# boot, so expect TCG.
choose_accel() {
	local image=$1 cache
	VM_ACCEL=${ACCEL:-}
	cache=$CACHE/kvm-probe.$(cat /proc/sys/kernel/random/boot_id)
	if [ -z "$VM_ACCEL" ] && [ -f "$cache" ]; then
		VM_ACCEL=$(cat "$cache")
		info "KVM probe result of this host boot: $VM_ACCEL ($cache)"
	elif [ -z "$VM_ACCEL" ]; then
		if [ -w /dev/kvm ] &&
			timeout -k 5 25 qemu-system-x86_64 -accel kvm -m 256 -smp 1 -nographic \
				-no-reboot -kernel "$image" -append "console=ttyS0 panic=-1" </dev/null 2>&1 |
			grep -q -m1 'Kernel panic\|VFS: Unable to mount root'; then
			VM_ACCEL=kvm
		else
			VM_ACCEL=tcg
		fi
		rm -f "$CACHE"/kvm-probe.*
		echo "$VM_ACCEL" >"$cache"
	fi
	case "$VM_ACCEL" in
	kvm) info "accelerator: KVM (probe boot succeeded)" ;;
	tcg) info "accelerator: TCG software emulation (KVM ${ACCEL:+not requested}${ACCEL:-probe boot hung or /dev/kvm unusable}); expect a slow guest" ;;
	*) die "ACCEL=$VM_ACCEL: use kvm or tcg" ;;
	esac
}

# vm_boot IMAGE OUT GUEST_CMD: boot IMAGE with virtme-ng (VM_CPUS vCPUs,
# default 2; VM_MEM, default 2G; VM_APPEND, more kernel command line; the
# accelerator of choose_accel, which must have run) and run GUEST_CMD in it, the repo as working directory and OUT
# writable, through vm_run (its timeout, console.log and checks).
vm_boot() {
	local image=$1 out=$2 cmd=$3 cmdline="log_buf_len=16M${VM_APPEND:+ $VM_APPEND}" cpus
	local -a vngargs
	command -v vng >/dev/null || die "vng not found: run 'make setup'"
	command -v udevadm >/dev/null || die "vng's script mode needs udev on the host: run 'make setup'"
	# KASAN on x86_64 with 5-level paging (QEMU's TCG CPU has LA57): while
	# identify_cpu() re-reads the boot CPU's capabilities, with interrupts on,
	# the LA57 bit is clear, pgtable_l5_enabled() says no, KASAN's shadow
	# start moves and an interrupt then reports a wild-memory-access on its
	# irq_desc (7.3.4, at 0.006 s, before any of our code runs). Boot with
	# 4-level paging.
	if [ "$SANITIZE" = kasan ] && [ "$ARCH" = x86_64 ]; then
		info "KASAN: booting with no5lvl (7.3's early-boot LA57 false report)"
		cmdline+=" no5lvl"
	fi
	cpus=$(vm_cpus)
	vngargs=(--run "$image" --verbose --cpus "$cpus" --memory "${VM_MEM:-2G}"
		--rwdir "$out" --cwd "$REPO"
		--append "$cmdline")
	[ "$VM_ACCEL" = tcg ] && vngargs+=(--disable-kvm)

	info "booting $image ($cpus vCPUs, ${VM_MEM:-2G}, timeout ${VM_TIMEOUT:-1200}s); console: $out/console.log"
	vm_run "$out" "$VM_ACCEL" vng "${vngargs[@]}" --exec "$cmd"
}

# vm_run OUT ACCEL COMMAND...: run the guest COMMAND (vng or QEMU) for at most
# VM_TIMEOUT seconds (default 1200), its output (the kernel's console and the
# guest script's) into OUT/console.log; lines starting with "==>", "#", "ok",
# "not ok" or "error" are echoed. Writes OUT/boot-secs and OUT/accel (ACCEL).
# Dies, with the last kernel lines, when the guest timed out or did not create
# OUT/guest-done. When QEMU itself aborted on one of its own assertions (seen
# once under TCG: msix_table_mmio_write() during PCI probing), that is not the
# guest's failure: it says so, keeps that console as OUT/console.qemu-abort.log
# and boots once more.
vm_run() {
	local out=$1 accel=$2 start took rc attempt abort
	shift 2
	for attempt in 1 2; do
		start=$(date +%s)
		# QEMU must not write straight into a file (it reopens fd 1/2): pipe it.
		# Its exit status goes through a file: the pipeline's is grep's.
		{
			rc=0
			timeout -k 10 "${VM_TIMEOUT:-1200}" "$@" </dev/null 2>&1 || rc=$?
			echo "$rc" >"$out/.vm-rc"
		} | tee "$out/console.log" | sed -u 's/^/    | /' |
			grep --line-buffered -E '^    \| (==>|#|ok|not ok|error)' || true
		rc=$(cat "$out/.vm-rc")
		rm -f "$out/.vm-rc"
		took=$(($(date +%s) - start))
		if [ "$attempt" != 1 ] || [ -f "$out/guest-done" ]; then
			break
		fi
		abort=$(grep -m1 -E '^qemu-system-[a-z0-9_]+: .*Assertion .* failed' "$out/console.log" || true)
		[ -n "$abort" ] || break
		mv "$out/console.log" "$out/console.qemu-abort.log"
		info "QEMU aborted after ${took}s, not the guest: '$abort' (console: $out/console.qemu-abort.log); booting once more"
	done
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
}
