#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Boot the stock kernel (BASELINE=1) and ours, already built with the bench
# binary (make bench does both), once per vCPU count, with the same config,
# memory and accelerator, and run scripts/guest/run-bench.sh in each; then
# scripts/bench.py aggregates every run into out/bench/: results.json, the
# table (table.md, also printed) and the chart of the ratios (ratios.png).
#
# Environment:
#   BENCH_CPUS      vCPU counts, one boot per kernel and count (default "2 4")
#   BENCH_RUNS      runs per workload, at least 5 for the table (default 5)
#   BENCH_DURATION  measured seconds per run (default 5)
#   BENCH_WARMUP    warm-up seconds per run (default 1)
#   BENCH_ONLY      extended regex of workload ids to run (default: all)
#   BENCH_PROFILE   extended regex of workload ids to profile: one more run
#                   each under perf in the guest (raw/<kernel>-<n>cpu/perf/)
#   BENCH_TIMEOUT   seconds per boot (default 10800)
#   VM_MEM, ACCEL   as for scripts/run-vm.sh
# Raw outputs: out/bench/raw/<kernel>-<n>cpu/ (bench.jsonl, logs/, console.log).
#
# Usage: [BENCH_CPUS="2 4"] [BENCH_RUNS=5] scripts/bench.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"
# Boots take the harness lock, as in scripts/run-vm.sh.
[ "${LSDEFER_LOCKED:-}" = 1 ] || exec "$REPO/scripts/locked.sh" "$0" "$@"
[ "$ARCH" = x86_64 ] || die "make bench runs on x86_64 only (the BPF selftests are not built for $ARCH)"
[ -z "${SANITIZE:-}" ] || die "make bench measures the plain build: unset SANITIZE"
[ -z "${BROKEN:-}" ] || die "make bench measures the real engine: unset BROKEN"

cpus=${BENCH_CPUS:-2 4}
runs=${BENCH_RUNS:-5}
for v in $cpus "$runs" "${BENCH_DURATION:-5}" "${BENCH_WARMUP:-1}"; do
	case "$v" in
	'' | *[!0-9]* | 0) die "BENCH_CPUS, BENCH_RUNS, BENCH_DURATION and BENCH_WARMUP must be positive numbers (got '$v')" ;;
	esac
done
[ "$runs" -ge 5 ] || info "BENCH_RUNS=$runs: the table wants at least 5 runs per cell; it will say so"

bench_root=${OUT:-$REPO/out}/bench
raw=$bench_root/raw

# Both images first, so that a missing build fails before hours of boots.
declare -A images
for b in 0 1; do
	obj=$(BASELINE=$b build_dir)
	images[$b]=$(BASELINE=$b boot_image "$obj")
	[ -x "$(selftests_dir "$obj")/bench" ] || die "no bench binary in $(selftests_dir "$obj"): run 'make bench' (it builds it with BENCH=1 scripts/selftests-build.sh)"
done
choose_accel "${images[0]}"

mkdir -p "$raw"
for n in $cpus; do
	for b in 1 0; do
		kernel=$(BASELINE=$b flavour)
		obj=$(BASELINE=$b build_dir)
		out=$raw/$kernel-${n}cpu
		rm -rf "$out"
		mkdir -p "$out"
		kmods=$(find "$obj/lsdefer-kmod" -name '*.ko' 2>/dev/null | sort | tr '\n' ' ')
		cat >"$out/bench.env" <<-ENV
			BENCH_DIR=$(selftests_dir "$obj")
			BENCH_RUNS=$runs
			BENCH_DURATION=${BENCH_DURATION:-5}
			BENCH_WARMUP=${BENCH_WARMUP:-1}
			BENCH_ONLY='${BENCH_ONLY:-}'
			BENCH_PROFILE='${BENCH_PROFILE:-}'
			BENCH_KERNEL=$kernel
			KMODS="$kmods"
		ENV
		info "bench: $kernel kernel, $n vCPUs, $runs runs per workload"
		VM_CPUS=$n VM_TIMEOUT=${BENCH_TIMEOUT:-10800} \
			vm_boot "${images[$b]}" "$out" "$REPO/scripts/guest/run-bench.sh $out"
	done
done

# matplotlib lives in the harness venv (scripts/setup.sh)
py=$VNG_VENV/bin/python3
[ -x "$py" ] || die "no $py: run 'make setup'"
"$py" "$REPO/scripts/bench.py" --out "$bench_root" --min-runs 5 "$raw"/*/bench.jsonl
