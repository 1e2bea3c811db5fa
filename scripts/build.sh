#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Build the configured kernel (O= in the cache), incrementally. Only one
# kernel build runs at a time on this machine: the build holds
# $CACHE/build.lock. Progress: a line every PROGRESS_SECS (default 60) with
# the elapsed time, the number of steps (CC, RUSTC, LD ...) done, out of the
# count of the largest build so far in this build dir when there was one,
# and the last step; the full log is kept in <build dir>/build.log.
#
# Usage: [ARCH=..] [BASELINE=1] [SANITIZE=kasan] [KDIR=..] [JOBS=n] scripts/build.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"

tree=$(tree_dir)
obj=$(build_dir)
[ -f "$obj/.config" ] || die "$obj is not configured: run scripts/configure.sh"
mapfile -t mk < <(kmake_vars)
jobs=${JOBS:-$(nproc)}
log=$obj/build.log
every=${PROGRESS_SECS:-60}

[ "${LSDEFER_LOCKED:-}" = 1 ] || exec "$REPO/scripts/locked.sh" "$0" "$@"

make -s -C "$tree" O="$obj" "${mk[@]}" rustavailable >/dev/null 2>&1 ||
	die "make rustavailable says no: $(make -C "$tree" O="$obj" "${mk[@]}" rustavailable 2>&1 | tail -3)"

rm -f "$obj/.lsdefer-image-variant"
info "building $(kernel_version "$tree") ($ARCH, $(flavour)${SANITIZE:+, $SANITIZE}) in $obj, log: $log"
start=$(date +%s)
command -v ccache >/dev/null || die "ccache not found: run 'make setup'"
ccache -z >/dev/null
# Without the outer make's flags: its -s (make -s vmtest) would silence
# Kbuild's "  CC  file" lines, which the log and the progress line show.
steps_file=$obj/.lsdefer-build-steps
steps_total=$(cat "$steps_file" 2>/dev/null || true)
env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL \
	make -C "$tree" O="$obj" "${mk[@]}" -j"$jobs" all >"$log" 2>&1 &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
	for _ in $(seq "$every"); do
		sleep 1
		kill -0 "$pid" 2>/dev/null || break
	done
	kill -0 "$pid" 2>/dev/null || break
	n=$(grep -cE '^  [A-Z]' "$log" || true)
	step=$(grep -E '^  [A-Z]' "$log" | tail -1 | sed 's/^ *//;s/  */ /g' || true)
	printf '    [%4ds] %s steps%s, last: %s\n' $(($(date +%s) - start)) "$n" \
		"${steps_total:+ (largest build here: $steps_total)}" "${step:-none yet}"
done
rc=0
wait "$pid" || rc=$?
took=$(($(date +%s) - start))
if [ "$rc" != 0 ]; then
	grep -E 'error|Error|ERROR' "$log" | head -40 >&2 || true
	die "kernel build failed after ${took}s (exit $rc); full log: $log"
fi
[ -f "$obj/$KIMAGE" ] || die "build finished but $obj/$KIMAGE is missing"

# Compiler and clippy warnings in our overlay's files fail the build. (Only
# the files this build recompiled can show up here.)
if [ -f "$tree/.lsdefer-overlay" ]; then
	warn=$(grep -n -E -A3 '^(warning|error)(\[|:)|: warning:' "$log" |
		grep -F -f <(grep -E '\.(rs|c|h)$' "$tree/.lsdefer-overlay") || true)
	if [ -n "$warn" ]; then
		echo "$warn" >&2
		die "the build warned about our files (above); full log: $log"
	fi
fi
# ccache's figures of this build (the lock keeps other builds out of them).
ccache --print-stats | awk -v obj="$obj" '
	$1 ~ /^(direct|preprocessed)_cache_hit$/ { hit += $2 }
	$1 == "cache_miss" { miss = $2 }
	END { printf "%d C compiles from ccache, %d compiled\n", hit, miss > (obj "/.lsdefer-last-build-ccache") }'
info "ccache: $(cat "$obj/.lsdefer-last-build-ccache") ($CCACHE_DIR)"
echo "$took" >"$obj/.lsdefer-last-build-secs"
# The step count of the largest build so far (a cold one): the next cold
# build's progress line counts against it.
n=$(grep -cE '^  [A-Z]' "$log" || true)
[ "$n" -le "${steps_total:-0}" ] || echo "$n" >"$steps_file"
# Which variant the image is: BROKEN builds share this build dir.
echo "${BROKEN:-none}" >"$obj/.lsdefer-image-variant"
info "kernel built in ${took}s: $obj/$KIMAGE"
