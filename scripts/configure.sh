#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Configure the build dir (O=) for the harness tree:
#   a base (config_base_targets in scripts/lib.sh: defconfig; on arm64
#   defconfig then mod2noconfig) + virtme-ng's guest fragment + the fragments
#   of config_fragments, later ones winning, then olddefconfig.
# Then check that every option requested survived in .config: Kconfig drops
# options silently when a dependency is missing (CONFIG_RUST with
# MODVERSIONS on, for one). Any loss is fatal.
#
# A build dir already configured from the same inputs is left as it is. When
# an input changed, .config is generated afresh; Kbuild tracks options one by
# one, so the next build still only rebuilds what the change affects.
#
# Usage: [ARCH=..] [BASELINE=1] [SANITIZE=kasan] [KDIR=..] scripts/configure.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"

tree=$(tree_dir)
obj=$(build_dir)
[ -f "$tree/Makefile" ] || die "no harness tree at $tree: run scripts/tree.sh"
mapfile -t frags < <(config_fragments)
for f in "${frags[@]}"; do
	[ -f "$f" ] || die "config fragment $f is missing"
done
mapfile -t mk < <(kmake_vars)
mkdir -p "$obj"

vngfrag=$obj/.lsdefer-vng.config
vngarch=$ARCH
[ "$ARCH" = arm64 ] && vngarch=aarch64
"$VNG_VENV/bin/virtme-configkernel" --arch "$vngarch" --defconfig --dry-run >"$vngfrag" ||
	die "virtme-configkernel --dry-run failed"

read -ra base <<<"$(config_base_targets)"
stamp=$obj/.lsdefer-config-inputs
# (defconfig alone is not named: the stamps of existing build dirs stay valid)
want=$({
	[ "${base[*]}" = defconfig ] || echo "base: ${base[*]}"
	cat "$vngfrag" "${frags[@]}"
} | sha256sum)
if [ -f "$obj/.config" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
	info "config of $obj is up to date"
else
	info "configuring $obj"
	make -s -C "$tree" O="$obj" "${mk[@]}" "${base[@]}" >/dev/null
	{
		echo
		cat "$vngfrag"
		for f in "${frags[@]}"; do
			echo
			echo "# ---- $f"
			cat "$f"
		done
	} >>"$obj/.config"
	make -s -C "$tree" O="$obj" "${mk[@]}" olddefconfig 2>&1 |
		grep -v 'override: reassigning\|^\.config:[0-9]*:warning: override' || true
	rm -f "$stamp"
fi

# Requested value of each symbol, last fragment wins. virtme-ng's options
# before its "Arch-specific" marker are optional by its own definition.
req=$(mktemp)
trap 'rm -f "$req"' EXIT
{
	sed '1,/^##: Arch-specific options/d' "$vngfrag"
	cat "${frags[@]}"
} | sed -n -e 's/^\(CONFIG_[A-Za-z0-9_]*\)=\(.*\)$/\1 \2/p' \
	-e 's/^# \(CONFIG_[A-Za-z0-9_]*\) is not set$/\1 n/p' |
	awk '{ v[$1] = $2; if (!($1 in o)) o[$1] = ++n } END { for (k in v) print o[k], k, v[k] }' |
	sort -n | cut -d' ' -f2- >"$req"

# Symbols no Kconfig file declares (virtme-ng's list carries some from older
# kernels) cannot be set; they are named, not counted.
known=$(mktemp)
trap 'rm -f "$req" "$known"' EXIT
# Other architectures' Kconfig files do not count: virtme-ng asks for
# EARLY_PRINTK on arm64, which only x86, s390 and sh declare.
find "$tree" -path "$tree/$BUILD_SUBDIR-*" -prune -o -name 'Kconfig*' -not -path '*/tools/*' \
	\( -not -path "$tree/arch/*/*" -o -path "$tree/arch/$KARCH/*" \) -print0 |
	xargs -0 sed -n 's/^[[:space:]]*\(menu\)\{0,1\}config[[:space:]]\{1,\}\([A-Za-z0-9_]*\).*/CONFIG_\2/p' |
	LC_ALL=C sort -u >"$known"

lost=0
while read -r sym val; do
	if ! LC_ALL=C look "$sym" "$known" | grep -qx "$sym"; then
		echo "  note: $sym is not a symbol of this kernel; ignored" >&2
		continue
	fi
	have=$(sed -n "s/^$sym=\\(.*\\)$/\\1/p" "$obj/.config")
	[ -n "$have" ] || have=n
	if [ "$val" != "$have" ]; then
		echo "  $sym: requested $val, got $have" >&2
		lost=$((lost + 1))
	fi
done <"$req"
if [ "$lost" != 0 ]; then
	die "$lost requested config option(s) did not survive in $obj/.config (see above); fix the fragments under qemu/"
fi
grep -q '^CONFIG_RUST=y$' "$obj/.config" || die "CONFIG_RUST=y did not survive"
echo "$want" >"$stamp"
info "config OK: $(wc -l <"$req") requested options all present in $obj/.config"

# Tell other tools where the current tree and build dir are.
[ "$BASELINE" = 1 ] || [ -n "$SANITIZE" ] || printf 'SRC=%s\nOBJ=%s\n' "$tree" "$obj" >"$CACHE/CURRENT"
