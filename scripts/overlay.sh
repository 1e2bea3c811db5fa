#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Put the repo's overlay into the harness-owned tree, repeatably:
#   rust/kernel/**     -> rust/kernel/**       (new Rust abstractions)
#   rust/helpers/**    -> rust/helpers/**      (C helpers for static inlines)
#   rust/bpf/**        -> kernel/bpf/**        (the deferral engine)
#   selftests/bpf/**   -> tools/testing/selftests/bpf/**
#   patches/*.patch    -> applied in order (patch -p1) to pristine copies
#   selftests/fixups/*.patch -> applied in every flavour (selftests toolchain
#                        fixes, not part of the series)
#   BROKEN=<n>: selftests/broken/broken-<n>*.patch on top, on purpose, to show
#   that the tests catch the seed patch's bugs (same tree and build dir).
# Only files whose content changes are rewritten, so make rebuilds only what
# an edit touches. A file that leaves the overlay is restored from the
# pristine source (or deleted if the overlay created it).
# With BASELINE=1 only selftests/bpf and the fixups apply: the kernel is the
# stock kernel.
#
# Usage: [KDIR=/path] [BASELINE=1] scripts/overlay.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"

src=$(pristine_dir)
dst=$(tree_dir)
[ -f "$dst/Makefile" ] || die "no harness tree at $dst: run scripts/tree.sh first"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# map_dir REPO_SUBDIR TREE_SUBDIR
map_dir() {
	[ -d "$REPO/$1" ] || return 0
	mkdir -p "$stage/$2"
	(cd "$REPO/$1" && find . -type f ! -name '*~' ! -name '.*.swp' -print0) |
		while IFS= read -r -d '' f; do
			mkdir -p "$(dirname "$stage/$2/$f")"
			cp "$REPO/$1/$f" "$stage/$2/$f"
		done
}

# apply_patch FILE: stage the pristine version of each target not staged yet,
# then apply FILE to the stage.
apply_patch() {
	sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$1" | while read -r f; do
		if [ ! -e "$stage/$f" ] && [ -f "$src/$f" ]; then
			mkdir -p "$(dirname "$stage/$f")"
			cp "$src/$f" "$stage/$f"
		fi
	done
	patch -p1 -s -f --no-backup-if-mismatch -d "$stage" <"$1" >"$stage/.patch.log" 2>&1 ||
		die "patch $(basename "$1") does not apply: $(cat "$stage/.patch.log")"
	rm -f "$stage/.patch.log"
}

[ -z "${BROKEN:-}" ] || [ "$BASELINE" != 1 ] || die "BROKEN= and BASELINE=1 exclude each other"
if [ "$BASELINE" != 1 ]; then
	map_dir rust/kernel rust/kernel
	map_dir rust/helpers rust/helpers
	map_dir rust/bpf kernel/bpf
	shopt -s nullglob
	for p in "$REPO"/patches/*.patch; do
		apply_patch "$p"
	done
	if [ -n "${BROKEN:-}" ]; then
		broken=("$REPO"/selftests/broken/broken-"$BROKEN"*.patch)
		[ "${#broken[@]}" = 1 ] ||
			die "BROKEN=$BROKEN matches ${#broken[@]} patches in selftests/broken (want exactly one)"
		info "BROKEN=$BROKEN: applying $(basename "${broken[0]}") on purpose"
		apply_patch "${broken[0]}"
	fi
	shopt -u nullglob
fi
# Our selftests (test code only, no kernel change) and the toolchain fixups of
# the selftests build go into every flavour, baseline included.
map_dir selftests/bpf tools/testing/selftests/bpf
shopt -s nullglob
for p in "$REPO"/selftests/fixups/*.patch; do
	apply_patch "$p"
done
shopt -u nullglob

new=$(mktemp)
trap 'rm -rf "$stage" "$new"' EXIT
(cd "$stage" && find . -type f | sed 's|^\./||' | LC_ALL=C sort) >"$new"

changed=0
shared_hdr=0
while read -r f; do
	if ! cmp -s "$stage/$f" "$dst/$f"; then
		mkdir -p "$(dirname "$dst/$f")"
		cp "$stage/$f" "$dst/$f.lsdefer-tmp"
		mv "$dst/$f.lsdefer-tmp" "$dst/$f"
		echo "  updated $f"
		changed=$((changed + 1))
		case "$f" in
		tools/testing/selftests/bpf/*/*) ;;
		tools/testing/selftests/bpf/*.h) shared_hdr=1 ;;
		esac
	fi
done <"$new"
# The selftests Makefile rebuilds a BPF object when progs/*.h change, not when
# a header of the directory above does: touch our programs, which include ours.
if [ "$shared_hdr" = 1 ]; then
	grep '^tools/testing/selftests/bpf/progs/.*\.c$' "$new" | while read -r f; do
		touch "$dst/$f"
		echo "  touched $f (a shared header changed)"
	done
fi

if [ -f "$dst/.lsdefer-overlay" ]; then
	LC_ALL=C comm -23 "$dst/.lsdefer-overlay" "$new" | while read -r f; do
		if [ -f "$src/$f" ]; then
			cp "$src/$f" "$dst/$f" # fresh mtime: make sees the change
			echo "  restored $f"
		else
			rm -f "$dst/$f"
			echo "  removed $f"
		fi
	done
fi
cp "$new" "$dst/.lsdefer-overlay"
info "overlay: $(wc -l <"$new") files managed, $changed rewritten ($(flavour))"
