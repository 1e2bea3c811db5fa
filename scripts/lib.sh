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

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${LSDEFER_CACHE:-$HOME/.cache/lsdefer}
ARCH=${ARCH:-x86_64}
BASELINE=${BASELINE:-0}
SANITIZE=${SANITIZE:-}

TOOLS=$CACHE/tools
RUST_LIB_SRC=$TOOLS/rust-src-$RUST_SRC_VER/usr/lib/rustlib/src/rust/library
BINDGEN_DIR=$TOOLS/bindgen-$BINDGEN_VER/bin
VNG_VENV=$TOOLS/vng-$VNG_VER
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
	local -a v=("ARCH=$KARCH" CLIPPY=1)
	if [ "$SANITIZE" = kasan ]; then
		v+=("LLVM=-$LLVM_VER")
	elif [ -n "$CROSS_COMPILE" ]; then
		v+=("CROSS_COMPILE=$CROSS_COMPILE")
	fi
	printf '%s\n' "${v[@]}"
}

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
build_dir() {
	echo "$CACHE/build/$(src_id)-$(flavour)-$ARCH${SANITIZE:+-$SANITIZE}"
}

kernel_version() {
	make -s -C "$1" kernelversion 2>/dev/null
}

# Guest outputs of one run.
out_dir() {
	echo "${OUT:-$REPO/out}/$ARCH-$(flavour)${SANITIZE:+-$SANITIZE}${BROKEN:+-broken-$BROKEN}${VM_CPUS:+-${VM_CPUS}cpus}"
}
