#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Build the BPF selftests (test_progs, test_maps and the test modules) for the
# harness kernel, in the harness-owned tree (the selftests build writes into
# its source directory), against the build dir's vmlinux BTF. clang/llvm-19,
# static link. Incremental; takes the same lock as the kernel build. KDIR is
# unset for it: test_kmods/Makefile has its own KDIR (our tree, via O=).
# Our own test module (top-level Kbuild) is built with M=<repo> MO=<dir>.
#
# Usage: [ARCH=..] [BASELINE=1] [SANITIZE=kasan] [KDIR=..] scripts/selftests-build.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"

tree=$(tree_dir)
obj=$(build_dir)
st=$tree/tools/testing/selftests/bpf
[ -f "$obj/vmlinux" ] || die "no vmlinux in $obj: build the kernel first"
if [ "$ARCH" != x86_64 ]; then
	info "ARCH=$ARCH: BPF selftests not built (no $ARCH root filesystem to run them yet): KUnit only"
	exit 0
fi
mapfile -t mk < <(kmake_vars)
log=$obj/selftests-build.log

[ "${LSDEFER_LOCKED:-}" = 1 ] || exec "$REPO/scripts/locked.sh" "$0" "$@"

# Bookworm's clang-19 predates the default of newer clangs; libarena's BPF
# objects use v4 instructions, so build them with -mcpu=v4 explicitly.
stvars=(
	O="$obj" VMLINUX_BTF="$obj/vmlinux"
	CLANG="clang-$LLVM_VER" LLC="llc-$LLVM_VER" LLVM_STRIP="llvm-strip-$LLVM_VER"
	LLVM_CONFIG="llvm-config-$LLVM_VER"
	SKIP_DOCS=1 SKIP_LLVM=1 SKIP_LIBBFD=1
	PKG_CONFIG="pkg-config --static" EXTRA_LDFLAGS=-static
	BPF_STRICT_BUILD=1
)
# A clang-built kernel (SANITIZE=kasan) needs its test modules built by clang.
[ "$SANITIZE" != kasan ] || stvars+=("LLVM=-$LLVM_VER")

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
	rm -f "$obj"/bpf_test*.ko
fi

info "building BPF selftests in $st (log: $log)"
start=$(date +%s)
rc=0
env -u KDIR make -C "$st" "${stvars[@]}" -j"${JOBS:-$(nproc)}" test_progs test_maps >"$log" 2>&1 || rc=$?
if [ "$rc" != 0 ]; then
	grep -E 'error|Error' "$log" | head -30 >&2 || true
	die "selftests build failed (exit $rc); full log: $log"
fi

printf '%s\n' "$obj" >"$stamp"

if [ -f "$REPO/Kbuild" ]; then
	info "building our test module(s) from $REPO/Kbuild"
	make -C "$tree" O="$obj" "${mk[@]}" M="$REPO" MO="$obj/lsdefer-kmod" \
		-j"${JOBS:-$(nproc)}" modules >>"$log" 2>&1 ||
		die "test module build failed; full log: $log"
fi
info "selftests built in $(($(date +%s) - start))s"
