# SPDX-License-Identifier: GPL-2.0
#
# Entry points (see README.md):
#   make test      everything CI checks: lint, vmtest on x86_64 for our kernel
#                  and for the stock one (BASELINE=1), and their comparison;
#                  our kernel on arm64 too (KUnit and the same selftests)
#   make vmtest    set up, overlay, configure, build, boot, run KUnit, report
#   make seed-bugs the new selftests against the seed patch's three bugs
#                  (BROKEN=1, 2, 3), then against the real engine
#   make mutants   every single-point break of the engine (MUTANTS=id ...
#                  for some), KUnit and the new selftests on each: the table
#                  of which test killed which mutant (hours; not in make test)
#   make bench     stock kernel and ours, same config, memory and vCPUs
#                  (BENCH_CPUS, default "2 4": one boot per kernel and
#                  count), BENCH_RUNS (default 5) runs of every workload:
#                  out/bench/{results.json,table.md,ratios.png} (hours)
#   make bench-readme  the README's benchmark section from out/bench/raw
#   make code-compare  the read path's machine code in ours against stock
#                  (FUNCS="f ..." for others; both kernels built)
#
# Steps, each usable alone: setup tree config build selftests vm report
#                           compare lint
# Variables: ARCH=x86_64|arm64  KDIR=/path/to/linux  BASELINE=1
#            SANITIZE=kasan  ACCEL=kvm|tcg  VM_TIMEOUT=secs  JOBS=n
#            TESTS=test[,test]  SELFTESTS=0 (KUnit only)  VM_CPUS=n (2)
#            VM_APPEND=<more kernel command line>
#            TEST_MAPS=<map test>|all|0 (default: sk_storage_map)
#            LSDEFER_CACHE=dir (default ~/.cache/lsdefer)
#            BENCH_CPUS="2 4" BENCH_RUNS=5 BENCH_DURATION=5 BENCH_WARMUP=1
#            BENCH_ONLY=<regex of workload ids>
#            BENCH_PROFILE=<regex of workload ids to profile with perf>

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

export ARCH KDIR BASELINE BROKEN SANITIZE ACCEL VM_TIMEOUT VM_APPEND JOBS LSDEFER_CACHE TESTS SELFTESTS TEST_MAPS

S := scripts
LIB := source $(S)/lib.sh

.PHONY: help setup tree config build selftests vm report vmtest compare lint test clean \
	seed-bugs mutants bench bench-readme code-compare

help:
	@sed -n '3,27p' Makefile | sed 's/^# \{0,1\}//'

setup:
	@$(S)/setup.sh

# tree, overlay, config and build run under one lock (scripts/locked.sh):
# rewriting the tree under a running build would corrupt it.
tree:
	@$(S)/locked.sh bash -c '$(S)/tree.sh && $(S)/overlay.sh'

config:
	@$(S)/locked.sh bash -c '$(S)/tree.sh && $(S)/overlay.sh && $(S)/configure.sh'

build:
	@$(S)/locked.sh bash -c '$(S)/tree.sh && $(S)/overlay.sh && $(S)/configure.sh && $(S)/build.sh'

# The BPF selftests (test_progs, test_maps, test modules) for the built kernel.
selftests:
	@$(S)/locked.sh bash -c '$(S)/tree.sh && $(S)/overlay.sh && $(S)/selftests-build.sh' 

vm:
	@$(S)/run-vm.sh

# Suites that must show up in the guest's KTAP.
report:
	@$(LIB); expect=(); \
	while read -r s; do [ -n "$$s" ] && expect+=(--expect "$$s"); done \
		< <(grep -v '^#' selftests/kunit/suites.common; \
		    [ "$$BASELINE" = 1 ] || grep -sv '^#' selftests/kunit/suites.lsdefer || true); \
	python3 $(S)/report.py --tree "$$(tree_dir)" --out "$$(out_dir)" \
		--label "$$ARCH $$(flavour)$${SANITIZE:+ $$SANITIZE}$${BROKEN:+ BROKEN=$$BROKEN}" "$${expect[@]}"

# One lock for build, selftests and boot: another job (BROKEN=, a helper's
# run) must not swap the image in between.
vmtest: setup
	@start=$$(date +%s); \
	$(LIB); rm -rf "$$(out_dir)"; \
	vmrc=0; $(S)/locked.sh bash -c '\
		$(MAKE) -s --no-print-directory build && \
		{ [ "$${SELFTESTS:-1}" = 0 ] || $(MAKE) -s --no-print-directory selftests; } && \
		$(MAKE) -s --no-print-directory vm' || vmrc=$$?; \
	$(MAKE) -s --no-print-directory report || vmrc=1; \
	echo "==> vmtest took $$(( $$(date +%s) - start ))s"; \
	exit $$vmrc

lint: setup tree
	@$(S)/lint.sh

# Our kernel, then the stock kernel (same config and harness, no overlay);
# the comparison's line "N passed, N failed, N skipped" is the verdict.
# A second boot of ours with HOTPLUG_CPUS vCPUs runs KUnit and the CPU hotplug
# test there, several CPUs offline at a time; then ours on arm64 (its own
# cross build, KUnit and the same selftests, pseudo-NMIs). Both runs' counts
# join the verdict (compare.py --extra, one per ';'-separated entry of
# COMPARE_EXTRA). The runs are sequential: one kernel build at a time.
HOTPLUG_CPUS = 4
test: lint
	@rc=0; \
	$(MAKE) -s --no-print-directory vmtest ARCH=x86_64 BASELINE= || rc=1; \
	$(MAKE) -s --no-print-directory vmtest ARCH=x86_64 BASELINE= VM_CPUS=$(HOTPLUG_CPUS) \
		TESTS=ls_defer_hotplug || rc=1; \
	$(MAKE) -s --no-print-directory vmtest ARCH=x86_64 BASELINE=1 || true; \
	$(MAKE) -s --no-print-directory vmtest ARCH=arm64 BASELINE= || rc=1; \
	$(MAKE) -s --no-print-directory compare ARCH=x86_64 \
		COMPARE_EXTRA="$(HOTPLUG_CPUS) vCPUs=$$(source $(S)/lib.sh; \
			ARCH=x86_64 BASELINE= VM_CPUS=$(HOTPLUG_CPUS) out_dir)/results.json;arm64=$$(source $(S)/lib.sh; \
			ARCH=arm64 BASELINE= VM_CPUS= out_dir)/results.json" || rc=1; \
	exit $$rc

# The seed patch's three bugs (selftests/broken/broken-{1,2,3}-*.patch), each
# put back into the engine, against the new selftests; the real engine last,
# which also leaves its image in the cache. Not part of make test: four
# incremental rebuilds and boots, about 20 minutes.
SEED_TESTS = $(shell grep -v '^\#' selftests/lsdefer.tests | paste -sd, -)
seed-bugs: setup
	@for n in 1 2 3; do \
		$(MAKE) -s --no-print-directory vmtest BASELINE= BROKEN=$$n TESTS=$(SEED_TESTS) || true; \
	done; \
	$(MAKE) -s --no-print-directory vmtest BASELINE= BROKEN= TESTS=$(SEED_TESTS) || true; \
	$(LIB); args=(); \
	for n in 1 2 3; do args+=(--broken "$$n=$$(BASELINE= BROKEN=$$n out_dir)"); done; \
	python3 $(S)/seed-bugs.py --ours "$$(BASELINE= BROKEN= out_dir)" "$${args[@]}"

# Every variant of selftests/broken/gen.py, seed bugs and mutants (or
# MUTANTS="id ..."), generated against the current sources, then the real
# engine (scripts/mutants.sh: KUnit first for the Rust ones, the selftests for
# the C ones and for what KUnit does not kill);
# scripts/mutants.py prints which tests killed each. A hung guest is cut at
# MUTANT_TIMEOUT seconds.
MUTANTS ?=
MUTANT_TIMEOUT ?= 400
mutants: setup
	@MUTANT_TIMEOUT=$(MUTANT_TIMEOUT) $(S)/mutants.sh $(MUTANTS)

# Both kernels and their selftests with the bench binary (BENCH=1), each
# under the lock, then the boots (scripts/bench.sh: one per kernel and vCPU
# count) and the aggregation (scripts/bench.py).
BENCH_CPUS ?= 2 4
BENCH_RUNS ?= 5
# A regex holds '$': take it as given, or exporting it would expand '$|'.
override BENCH_ONLY := $(value BENCH_ONLY)
override BENCH_PROFILE := $(value BENCH_PROFILE)
export BENCH_CPUS BENCH_RUNS BENCH_DURATION BENCH_WARMUP BENCH_ONLY BENCH_PROFILE BENCH_TIMEOUT
bench: setup
	@[ -z "$(filter-out 0,$(BASELINE))$(BROKEN)$(SANITIZE)" ] || \
		{ echo "error: make bench builds and measures both plain kernels: unset BASELINE, BROKEN and SANITIZE" >&2; exit 1; }; \
	start=$$(date +%s); \
	for b in "" 1; do \
		BASELINE=$$b $(S)/locked.sh bash -c '\
			$(MAKE) -s --no-print-directory build && \
			BENCH=1 $(MAKE) -s --no-print-directory selftests' || exit 1; \
	done; \
	$(S)/bench.sh; \
	echo "==> bench took $$(( $$(date +%s) - start ))s"

# The README's "Benchmarks" block, regenerated from the last make bench's raw
# outputs (never edited by hand); the chart goes to docs/bench/ratios.png.
bench-readme:
	@$(LIB); "$$VNG_VENV/bin/python3" $(S)/bench.py --out out/bench --min-runs 5 \
		--readme README.md --readme-chart docs/bench/ratios.png out/bench/raw/*/bench.jsonl

code-compare:
	@$(S)/code-compare.sh $(FUNCS)

compare:
	@$(LIB); extra=(); IFS=';' read -ra runs <<<"$(COMPARE_EXTRA)"; \
	for r in "$${runs[@]}"; do [ -z "$$r" ] || extra+=(--extra "$$r"); done; \
	python3 $(S)/compare.py --ours "$$(BASELINE= VM_CPUS= out_dir)/results.json" \
		--base "$$(BASELINE=1 VM_CPUS= out_dir)/results.json" "$${extra[@]}"

clean:
	rm -rf out
