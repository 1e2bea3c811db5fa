#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Runs INSIDE the guest (started by scripts/bench.sh): every benchmark
# workload BENCH_RUNS times with the selftests' bench binary, each run's
# figures one JSON line in OUTDIR/bench.jsonl, its output in
# OUTDIR/logs/<workload>.<run>.log. OUTDIR/bench.env (written by the host)
# sets:
#   BENCH_DIR       the selftests build dir holding ./bench
#   BENCH_RUNS      runs per workload (default 5)
#   BENCH_DURATION  measured seconds per run (bench -d, default 5)
#   BENCH_WARMUP    warm-up seconds per run (bench -w, default 1)
#   BENCH_ONLY      extended regex: only workloads whose id matches
#   BENCH_KERNEL    lsdefer or baseline, copied into every line
#   KMODS           modules to load (lsdefer_testmod: kptr values, NMIs)
#   BENCH_PROFILE   extended regex: after its measured runs, each matching
#                   workload runs once more under perf (cpu-clock sampling,
#                   all CPUs: TCG has no PMU); the flat profile by symbol in
#                   OUTDIR/perf/<workload>.txt
# Lines: {"kernel","cpus","workload","bench","args","run","ok","rc","log",
# "metrics"}; metrics are the bench's own JSON line for the ls-defer-*
# benchmarks, {"ops_per_sec": ...} parsed from the Summary line for the
# upstream ones; "engine_run" is the engine's debugfs "total" counters over
# the whole run (our kernel only), null elsewhere.
# OUTDIR/guest-done tells the host the script finished.
#
# Usage: run-bench.sh OUTDIR
set -euo pipefail
out=${1:?usage: run-bench.sh OUTDIR}
[ -f "$out/bench.env" ] || { echo "error: no $out/bench.env (written by scripts/bench.sh)" >&2; exit 1; }
BENCH_DIR='' BENCH_RUNS=5 BENCH_DURATION=5 BENCH_WARMUP=1 BENCH_ONLY='' BENCH_KERNEL='' KMODS=''
BENCH_PROFILE=''
# shellcheck disable=SC1091
. "$out/bench.env"
[ -x "$BENCH_DIR/bench" ] || { echo "error: no $BENCH_DIR/bench: make bench builds it (BENCH=1 scripts/selftests-build.sh)" >&2; exit 1; }
case "$BENCH_RUNS$BENCH_DURATION$BENCH_WARMUP" in
*[!0-9]*) echo "error: BENCH_RUNS, BENCH_DURATION and BENCH_WARMUP must be numbers" >&2; exit 1 ;;
esac
if [ -n "$BENCH_PROFILE" ] && ! command -v perf >/dev/null; then
	echo "error: BENCH_PROFILE is set but there is no perf in the guest (make setup installs it)" >&2
	exit 1
fi

ncpu=$(nproc)
echo "==> guest: $(uname -r), $ncpu CPUs, $BENCH_KERNEL kernel, $BENCH_RUNS runs of -w$BENCH_WARMUP -d$BENCH_DURATION"
mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mountpoint -q /sys/kernel/tracing || mount -t tracefs none /sys/kernel/tracing
mod=0
for m in $KMODS; do
	echo "==> guest: insmod $(basename "$m")"
	insmod "$m" && mod=1
done
engine_stats=/sys/kernel/debug/bpf_local_storage_defer/stats
mkdir -p "$out/logs"
: >"$out/bench.jsonl"

# The workloads: "id|bench arguments". Producers 1..N: powers of two up to
# the vCPUs, and the vCPU count itself.
producers=1
for ((p = 2; p < ncpu; p *= 2)); do producers+=" $p"; done
[ "$ncpu" -gt 1 ] && producers+=" $ncpu"
workloads=(
	"create-task-b16|local-storage-create --storage-type task --batch-size 16"
	"create-task-b32|local-storage-create --storage-type task --batch-size 32"
	"create-sock-b16|local-storage-create --storage-type socket --batch-size 16"
	"create-sock-b32|local-storage-create --storage-type socket --batch-size 32"
	"get-seq-m16|--nr_maps 16 local-storage-cache-seq-get"
	"get-int-m16|--nr_maps 16 local-storage-cache-int-get"
	"get-seq-m100|--nr_maps 100 local-storage-cache-seq-get"
	"get-int-m100|--nr_maps 100 local-storage-cache-int-get"
)
for p in $producers; do
	workloads+=("delete-p$p|ls-defer-delete -p $p")
	[ "$mod" = 1 ] && workloads+=("delete-kptr-p$p|ls-defer-delete --defer-value kptr -p $p")
	workloads+=("update-p$p|ls-defer-update -p $p")
	workloads+=("exit-p$p|ls-defer-exit -p $p")
	workloads+=("map-churn-p$p|ls-defer-map-churn -p $p")
	# one CPU raises the NMIs, the other p - 1 take them
	[ "$mod" = 1 ] && [ "$p" -gt 1 ] &&
		workloads+=("nmi-delete-t$((p - 1))|ls-defer-nmi-delete -p $p")
done
# local-storage-tasks-trace's idea: the delete-to-free latency with many tasks
workloads+=("delete-sleepers1000|ls-defer-delete -p 1 --defer-sleepers 1000")
[ "$mod" = 1 ] || echo "==> guest: lsdefer_testmod not loaded: no kptr-value and no NMI workloads"

# engine_totals: the engine's "total" lines as one JSON object, or null
engine_totals() {
	[ -r "$engine_stats" ] || { echo null; return; }
	awk '$2 == "total" {
		printf "%s\"%s\":[%s,%s,%s,%s,%s,%s,%s,%s,%s]", n++ ? "," : "{", $1,
			$3, $4, $5, $6, $7, $8, $9, $10, $11
	} END { print n ? "}" : "null" }' "$engine_stats"
}

# engine_delta BEFORE AFTER: queued, batches, gps, freed, flushed, offloads
# over the run, per engine (max_pending, max_step, max_step_ns: since boot)
engine_delta() {
	python3 - "$1" "$2" <<-'PY'
		import json, sys
		b, a = json.loads(sys.argv[1]), json.loads(sys.argv[2])
		if not b or not a:
		    print("null")
		    sys.exit(0)
		names = ["queued", "batches", "gps", "freed", "flushed", "max_pending",
		         "offloads", "max_step", "max_step_ns"]
		since_boot = {"max_pending", "max_step", "max_step_ns"}
		print(json.dumps({e: {n: a[e][i] if n in since_boot else a[e][i] - b[e][i]
		                      for i, n in enumerate(names)} for e in a if e in b}))
	PY
}

# metrics LOG: the run's figures as one JSON object, or empty
metrics() {
	local line
	line=$(grep -a '^lsdefer-bench: ' "$1" | tail -n 1) || true
	if [ -n "$line" ]; then
		echo "${line#lsdefer-bench: }"
		return
	fi
	# local-storage-create: "Summary: creates N ± Nk/s (...)"
	line=$(grep -a '^Summary: creates' "$1" | tail -n 1) || true
	if [ -n "$line" ]; then
		awk '{ printf "{\"ops_per_sec\":%.1f,\"ops_per_sec_stddev\":%.1f}\n", $3 * 1000, $5 * 1000 }' \
			<<<"${line//k\/s/}"
		return
	fi
	# local-storage-cache-*: "Summary: hits throughput N ± N M ops/s, hits latency N ns/op, ..."
	line=$(grep -a '^Summary: hits throughput' "$1" | tail -n 1) || true
	if [ -n "$line" ]; then
		awk '{ printf "{\"ops_per_sec\":%.1f,\"ops_per_sec_stddev\":%.1f,\"ns_per_op\":%s}\n",
			$4 * 1e6, $6 * 1e6, $11 }' <<<"$line"
	fi
}

# bench_run LOG BARGS [CMD...]: ./bench BARGS with the warmup and duration,
# under CMD if given (perf record ... --), bounded in time, its output into
# LOG; returns its exit status.
bench_run() {
	local log=$1 bargs=$2
	shift 2
	# shellcheck disable=SC2086 # bargs is a word list
	(cd "$BENCH_DIR" && timeout -k 10 $((BENCH_WARMUP + BENCH_DURATION + 120)) \
		"$@" ./bench -w"$BENCH_WARMUP" -d"$BENCH_DURATION" $bargs) >"$log" 2>&1
}

# profile ID BARGS: one more run of workload ID under perf, not counted; its
# flat profile (symbols above 0.2% of the samples) in perf/ID.txt
profile() {
	# perf record writes into the guest's /tmp: on the 9p share it fails
	local id=$1 bargs=$2 data=/tmp/perf-$1.data rc=0
	mkdir -p "$out/perf"
	echo 0 >/proc/sys/kernel/kptr_restrict
	bench_run "$out/perf/$id.log" "$bargs" perf record -q -e cpu-clock -F 999 -a -o "$data" -- ||
		rc=$?
	if [ "$rc" != 0 ]; then
		echo "==> guest: $id: profiled run FAILED (exit $rc): $(tail -n 1 "$out/perf/$id.log")"
		failed=$((failed + 1))
		return
	fi
	perf report -i "$data" --stdio --no-children --sort sym --percent-limit 0.2 \
		>"$out/perf/$id.txt" 2>>"$out/perf/$id.log"
	rm -f "$data"
	echo "==> guest: $id: profiled ($(sed -n 's/^# Samples: \([^ ]*\) of event.*/\1 samples/p' "$out/perf/$id.txt")) in perf/$id.txt"
}

start=$(date +%s)
total=0
failed=0
for w in "${workloads[@]}"; do
	id=${w%%|*}
	bargs=${w#*|}
	if [ -n "$BENCH_ONLY" ] && ! [[ $id =~ $BENCH_ONLY ]]; then
		continue
	fi
	bench=$(awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^(local-storage|ls-defer)-/) { print $i; exit } }' <<<"$bargs")
	for ((run = 1; run <= BENCH_RUNS; run++)); do
		log=logs/$id.$run.log
		before=$(engine_totals)
		rc=0
		bench_run "$out/$log" "$bargs" || rc=$?
		after=$(engine_totals)
		m=$(metrics "$out/$log")
		ok=true
		if [ "$rc" != 0 ] || [ -z "$m" ]; then
			ok=false
			m=null
			failed=$((failed + 1))
			echo "==> guest: $id run $run FAILED (exit $rc): $(tail -n 1 "$out/$log")"
		fi
		total=$((total + 1))
		printf '{"kernel":"%s","cpus":%d,"workload":"%s","bench":"%s","args":"%s","run":%d,"ok":%s,"rc":%d,"log":"%s","metrics":%s,"engine_run":%s}\n' \
			"$BENCH_KERNEL" "$ncpu" "$id" "$bench" "$bargs" "$run" "$ok" "$rc" "$log" \
			"$m" "$(engine_delta "$before" "$after")" >>"$out/bench.jsonl"
	done
	echo "==> guest: $id: $BENCH_RUNS runs done ($(($(date +%s) - start))s)"
	if [ -n "$BENCH_PROFILE" ] && [[ $id =~ $BENCH_PROFILE ]]; then
		profile "$id" "$bargs"
	fi
done
echo "==> guest: $total runs, $failed failed, $(($(date +%s) - start))s"

dmesg >"$out/dmesg.txt"
touch "$out/guest-done"
