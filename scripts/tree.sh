#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Create or refresh the harness-owned kernel tree: a copy of the pristine
# source (the pinned Debian linux-source, or KDIR). The user's tree is only
# read. Files managed by the overlay (listed in <tree>/.lsdefer-overlay) are
# left alone here so their timestamps, and so incremental builds, survive.
#
# Usage: [KDIR=/path] [BASELINE=1] scripts/tree.sh
# Prints nothing but progress; the tree is at $(tree_dir) (scripts/lib.sh).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

src=$(pristine_dir)
dst=$(tree_dir)

if [ -n "${KDIR:-}" ]; then
	[ -d "$KDIR" ] || die "KDIR=$KDIR does not exist"
	if [ ! -f "$src/Makefile" ] || [ ! -f "$src/Kbuild" ] || [ ! -d "$src/kernel/bpf" ]; then
		die "KDIR=$KDIR is not a kernel source tree (no Makefile, Kbuild, kernel/bpf)"
	fi
	if [ -e "$src/.config" ] || [ -d "$src/include/config" ]; then
		die "KDIR=$KDIR has been configured or built in-tree; run 'make mrproper' there or point KDIR at a clean tree"
	fi
else
	[ -f "$src/Makefile" ] || die "pinned kernel source missing at $src: run 'make setup'"
fi

ver=$(kernel_version "$src") || die "cannot read the kernel version of $src"
case "$ver" in
7.3 | 7.3.* | 7.3-*) ;;
*)
	# The C patches target 7.3's bpf_local_storage.c; the baseline builds any tree.
	[ "$BASELINE" = 1 ] || die "kernel $ver in $src is not supported (need 7.3.x); BASELINE=1 builds it without our overlay"
	;;
esac
[ -f "$src/kernel/bpf/bpf_local_storage.c" ] ||
	die "$src has no kernel/bpf/bpf_local_storage.c"

mkdir -p "$dst"
excl=$(mktemp)
trap 'rm -f "$excl"' EXIT
if [ -f "$dst/.lsdefer-overlay" ]; then
	sed 's|^|/|' "$dst/.lsdefer-overlay" >"$excl"
fi
info "syncing $src -> $dst (kernel $ver)"
# P rules protect what the selftests build writes into its own directory, and
# the build dirs (lib.sh's build_dir).
rsync -a --delete --exclude=/.git --exclude=/.lsdefer-overlay \
	--exclude-from="$excl" \
	--filter='P /tools/testing/selftests/bpf/**' \
	--filter='P /tools/testing/selftests/bpf/' \
	--filter="P /$BUILD_SUBDIR-*/" \
	"$src/" "$dst/"
