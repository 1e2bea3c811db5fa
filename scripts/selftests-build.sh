#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Build the BPF selftests (test_progs, test_maps and the test modules) for the
# harness kernel, in the harness-owned tree (the selftests build writes into
# its source directory), against the build dir's vmlinux BTF, into
# lib.sh's selftests_dir (OUTPUT=). clang/llvm-19, static link. Incremental; takes the same lock as the kernel build. KDIR is
# unset for it: test_kmods/Makefile has its own KDIR (our tree, via O=).
# Our own test module (top-level Kbuild) is built with M=<repo> MO=<dir>.
# BENCH=1 (make bench) also builds the bench binary (benchs/, ours
# registered by selftests/fixups/0003-*), into the same OUTPUT= dir.
#
# ARCH=arm64: cross-built (ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-),
# test_progs and test_maps static, against the arm64 sysroot of
# scripts/setup.sh (ARM64_SYSROOT: bookworm's libelf, zlib, zstd, libssl).
# The target's compiler and pkg-config are the sysroot's wrappers, passed as
# CC and PKG_CONFIG: the Makefile builds its host tools (bpftool for the
# skeletons, resolve_btfids) with CC=$(HOSTCC) and ARCH= CROSS_COMPILE=, so
# they stay x86_64. BPF objects: clang --target=bpfel against the arm64
# vmlinux's BTF (vmlinux.h), -D__TARGET_ARCH_arm64 (the Makefile's SRCARCH).
#
# Usage: [ARCH=..] [BASELINE=1] [SANITIZE=kasan] [KDIR=..] [BENCH=1] scripts/selftests-build.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"

tree=$(tree_dir)
obj=$(build_dir)
stout=$(selftests_dir)
st=$tree/tools/testing/selftests/bpf
[ -f "$obj/vmlinux" ] || die "no vmlinux in $obj: build the kernel first"
mapfile -t mk < <(kmake_vars)
log=$obj/selftests-build.log

[ "${LSDEFER_LOCKED:-}" = 1 ] || exec "$REPO/scripts/locked.sh" "$0" "$@"

# Bookworm's clang-19 predates the default of newer clangs; libarena's BPF
# objects use v4 instructions, so build them with -mcpu=v4 explicitly.
stvars=(
	O="$obj" OUTPUT="$stout" VMLINUX_BTF="$obj/vmlinux"
	CLANG="clang-$LLVM_VER" LLC="llc-$LLVM_VER" LLVM_STRIP="llvm-strip-$LLVM_VER"
	LLVM_CONFIG="llvm-config-$LLVM_VER"
	SKIP_DOCS=1 SKIP_LLVM=1 SKIP_LIBBFD=1
	PKG_CONFIG="pkg-config --static" EXTRA_LDFLAGS=-static
	BPF_STRICT_BUILD=1
)
# A clang-built kernel (SANITIZE=kasan) needs its test modules built by clang.
[ "$SANITIZE" != kasan ] || stvars+=("LLVM=-$LLVM_VER")
if [ "$ARCH" = arm64 ]; then
	[ -f "$ARM64_SYSROOT/.done" ] || die "no arm64 sysroot at $ARM64_SYSROOT: run 'make setup'"
	# USERLDFLAGS (lib.mk) reaches the target links only: test_progs,
	# test_maps and their helpers static (urandom_read and its .so filter
	# -static out, as upstream does). EXTRA_LDFLAGS=-static (above) also
	# links the target bpftool statically, from the sysroot's libraries.
	# test_kmods/ inherit ARCH, CROSS_COMPILE and CC: modules for arm64.
	stvars+=(
		ARCH=arm64 CROSS_COMPILE="$CROSS_COMPILE"
		CC="$ARM64_SYSROOT/bin/${CROSS_COMPILE}gcc"
		PKG_CONFIG="$ARM64_SYSROOT/bin/pkg-config --static"
		USERLDFLAGS=-static
	)
fi

# test_kmods/ builds in the tree, which every flavour of this tree shares
# (ours, ours with SANITIZE=kasan): kbuild there does not notice that the
# kernel it builds against changed, and its objects would be linked for the
# wrong kernel ("struct module size must match"). Start them afresh when the
# build dir changes, and the copies in the build dir too.
stamp=$st/test_kmods/.lsdefer-built-for
if [ "$(cat "$stamp" 2>/dev/null)" != "$obj" ]; then
	info "test_kmods last built for another kernel: cleaning them"
	find "$st/test_kmods" -maxdepth 1 -type f \
		! -name '*.c' ! -name '*.h' ! -name Makefile -delete
	rm -f "$stout"/bpf_test*.ko
fi

mkdir -p "$stout"
info "building BPF selftests in $st into $stout (log: $log)"
start=$(date +%s)
rc=0
env -u KDIR make -C "$st" "${stvars[@]}" -j"${JOBS:-$(nproc)}" test_progs test_maps >"$log" 2>&1 || rc=$?
if [ "$rc" != 0 ]; then
	grep -E 'error|Error' "$log" | head -30 >&2 || true
	die "selftests build failed (exit $rc); full log: $log"
fi

printf '%s\n' "$obj" >"$stamp"
if [ "$ARCH" = arm64 ]; then
	for b in test_progs test_maps; do
		file -b "$stout/$b" | grep -q 'ARM aarch64.*statically linked' ||
			die "$stout/$b is not a static arm64 executable: $(file -b "$stout/$b")"
	done
fi

# A make of its own: a bench that does not build must not cost test_progs.
if [ "${BENCH:-0}" = 1 ]; then
	info "building the bench binary (log: $log)"
	rc=0
	env -u KDIR make -C "$st" "${stvars[@]}" -j"${JOBS:-$(nproc)}" bench >>"$log" 2>&1 || rc=$?
	if [ "$rc" != 0 ] || [ ! -x "$stout/bench" ]; then
		grep -E 'error|Error|SKIP-' "$log" | tail -30 >&2 || true
		die "bench build failed (exit $rc); full log: $log"
	fi
fi

if [ -f "$REPO/Kbuild" ]; then
	info "building our test module(s) from $REPO/Kbuild"
	make -C "$tree" O="$obj" "${mk[@]}" M="$REPO" MO="$obj/lsdefer-kmod" \
		-j"${JOBS:-$(nproc)}" modules >>"$log" 2>&1 ||
		die "test module build failed; full log: $log"
fi
info "selftests built in $(($(date +%s) - start))s"
