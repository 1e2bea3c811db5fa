#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# The repo's own lint: shellcheck on the scripts, rustfmt (the kernel's
# .rustfmt.toml) on our Rust, checkpatch.pl --strict on the patches and on our
# C files, a syntax check of the Python, and that selftests/broken/ is what
# gen.py generates. Clippy runs during the kernel
# build (CLIPPY=1, see scripts/build.sh). Needs the harness tree (make tree).
#
# Usage: scripts/lint.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"

src=$(pristine_dir)
tree=$(tree_dir)
[ -f "$tree/.lsdefer-overlay" ] || die "no harness tree with our overlay at $tree: run 'make tree'"
fail=0
check() {
	local what=$1
	shift
	if "$@"; then
		echo "  ok    $what"
	else
		echo "  FAIL  $what"
		fail=$((fail + 1))
	fi
}

cd "$REPO"
mapfile -t sh < <(find scripts .ci -type f \( -name '*.sh' -o -name run \))
check "shellcheck (${#sh[@]} scripts)" shellcheck -x "${sh[@]}"

mapfile -t rs < <(find rust selftests -name '*.rs' 2>/dev/null)
if [ "${#rs[@]}" -gt 0 ]; then
	check "rustfmt --check (${#rs[@]} files)" \
		rustfmt --check --edition 2021 --config-path "$src/.rustfmt.toml" "${rs[@]}"
fi

# checkpatch is the series' own (patches/ may teach it about new files), run
# from the harness tree, so that files are checked at their paths in the
# kernel: inside this git repo it would also take the patch files for new
# files of ours.
checkpatch() {
	(cd "$tree" && scripts/checkpatch.pl "$@")
}
cp_opts=(--strict --quiet --no-summary --show-types)
# Known false positive, per file: INCLUDE_LINUX asks for <linux/nmi.h>, but
# the x86 NMI handler API (register_nmi_handler(), NMI_LOCAL) lives only in
# <asm/nmi.h>, which <linux/nmi.h> includes only with ACPI APEI; x86 drivers
# outside arch/ include <asm/nmi.h> too (hpwdt, ipmi_watchdog, igen6_edac).
extra_opts() {
	case "$1" in
	patches/0001-rust-*.patch | selftests/kmod/lsdefer_testmod.c) echo --ignore=INCLUDE_LINUX ;;
	esac
}
mapfile -t pt < <(find patches -name '*.patch' 2>/dev/null | sort)
for p in "${pt[@]}"; do
	# shellcheck disable=SC2046 # one option or none
	check "checkpatch $p" checkpatch "${cp_opts[@]}" $(extra_opts "$p") "$REPO/$p"
done
# New C files of the overlay, at their tree paths (edits of existing files
# are checked through the patches), and the out-of-tree test module.
while read -r f; do
	case "$f" in *.c | *.h) ;; *) continue ;; esac
	[ -e "$src/$f" ] && continue
	check "checkpatch -f $f" checkpatch "${cp_opts[@]}" -f "$f"
done <"$tree/.lsdefer-overlay"
mapfile -t km < <(find selftests/kmod -name '*.[ch]' 2>/dev/null | sort)
for f in "${km[@]}"; do
	# shellcheck disable=SC2046 # one option or none
	check "checkpatch -f $f" checkpatch "${cp_opts[@]}" $(extra_opts "$f") -f "$REPO/$f"
done

mapfile -t py < <(find scripts selftests -name '*.py' | sort)
check "python syntax (${#py[@]} files)" python3 -m py_compile "${py[@]}"
# The broken variants and mutants are generated: the committed patches must
# be what gen.py makes of the current sources.
check "selftests/broken/*.patch up to date" python3 selftests/broken/gen.py --check --pristine "$src"

[ "$fail" = 0 ] || die "lint: $fail check(s) failed"
info "lint clean"
