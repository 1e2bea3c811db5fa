#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# make mutants: every variant of selftests/broken/gen.py, the seed patch's
# bugs and the engine mutants (or the ids given), each built, booted and
# tested, then the real engine; scripts/mutants.py tabulates which tests
# killed each one (out/mutants.json).
#
# A variant of the Rust engine or its helpers runs KUnit first (make vmtest
# SELFTESTS=0); only one that KUnit does not kill goes on to a second boot
# with KUnit and the ls_defer_* selftests, which is the only boot of a C
# variant (KUnit does not see the C wiring). A hung guest is cut at
# MUTANT_TIMEOUT seconds (default 400; a variant's guest
# normally takes about 125 s).
#
# Usage: scripts/mutants.sh [ID...]
set -euo pipefail
. "$(dirname "$0")/lib.sh"

timeout=${MUTANT_TIMEOUT:-400}
[[ "$timeout" =~ ^[1-9][0-9]*$ ]] || die "MUTANT_TIMEOUT=$timeout is not a number of seconds"

gen=(python3 "$REPO/selftests/broken/gen.py")
all=$("${gen[@]}" --list all)
engine=$("${gen[@]}" --list engine)
if [ $# -eq 0 ]; then
	read -r -a ids <<<"$all"
else
	ids=("$@")
	for m in "${ids[@]}"; do
		[[ " $all " == *" $m "* ]] || die "unknown mutant '$m' (known: $all)"
	done
fi
"${gen[@]}" --check

# The new selftests, comma-separated, as make seed-bugs runs them.
tests=$(grep -v '^#' "$REPO/selftests/lsdefer.tests" | grep . | paste -sd, -)

vmtest() {
	make -C "$REPO" -s --no-print-directory vmtest BASELINE= TESTS="$tests" \
		VM_TIMEOUT="$timeout" "$@" || true
}

# Whether the run in out dir $1 left results with a failure in them.
failed() {
	python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
sys.exit(0 if d.get("failed", 0) > 0 else 1)' "$1/results.json" 2>/dev/null
}

args=()
for m in "${ids[@]}"; do
	start=$(date +%s)
	out=$(BASELINE='' BROKEN=$m out_dir)
	stage=selftests
	if [[ " $engine " == *" $m "* ]]; then
		info "mutant $m: KUnit"
		vmtest BROKEN="$m" SELFTESTS=0
		failed "$out" && stage=KUnit
	fi
	if [ "$stage" = selftests ]; then
		info "mutant $m: KUnit and the selftests"
		vmtest BROKEN="$m"
	fi
	info "mutant $m: done in $(($(date +%s) - start))s (last stage: $stage)"
	args+=(--mutant "$m=$out")
done

info "the real engine"
vmtest BROKEN=
mkdir -p "$REPO/out"
python3 "$REPO/scripts/mutants.py" --ours "$(BASELINE='' BROKEN='' out_dir)" "${args[@]}" \
	--equivalent "$REPO/selftests/broken/EQUIVALENT.md" --json "$REPO/out/mutants.json"
