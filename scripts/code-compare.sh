#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# make code-compare: the machine code of kernel functions in our kernel and
# in stock 7.3, compared. Each function is disassembled from both vmlinux
# files (objdump), its addresses, symbol offsets and RIP-relative
# displacements replaced by placeholders, and the two listings diffed. It
# says, per function, where it sits in each kernel and whether the two run
# the same instructions; where they do not, the diff. For the benchmark's
# read path (README, make bench): when ours and stock run the same
# instructions there, a difference in its throughput does not come from code
# that the series changed.
#
# Both kernels must be built (make build, make build BASELINE=1).
#
# Usage: [ARCH=..] scripts/code-compare.sh [FUNC...]
#   default FUNCs: the task, cgroup and socket storage lookups and helpers,
#   and the lookup cache's insert
set -euo pipefail
. "$(dirname "$0")/lib.sh"

funcs=("$@")
if [ ${#funcs[@]} -eq 0 ]; then
	funcs=(bpf_task_storage_get task_storage_lookup bpf_cgrp_storage_get
		cgroup_storage_lookup bpf_sk_storage_get bpf_sk_storage_lookup
		__bpf_local_storage_insert_cache bpf_local_storage_lookup)
fi
for f in "${funcs[@]}"; do
	[[ "$f" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "'$f' is not a function name"
done

ours=$(BASELINE='' build_dir)/vmlinux
stock=$(BASELINE=1 build_dir)/vmlinux
for v in "$ours" "$stock"; do
	[ -f "$v" ] || die "no $v: build both kernels first (make build; make build BASELINE=1)"
done
objdump=${CROSS_COMPILE}objdump
command -v "$objdump" >/dev/null || die "$objdump not found (scripts/setup.sh installs binutils)"

# listing VMLINUX FUNC: FUNC's instructions, one a line, without addresses:
# 64-bit ones, RIP-relative displacements and the 32-bit sign-extended ones
# of the kernel's code model (per-CPU variables: -0x7c6f3e80(%rax)). A
# symbol's own offset is kept: it is a branch inside the function.
listing() {
	local dis
	dis=$("$objdump" -d --no-show-raw-insn --disassemble="$2" "$1") || die "$objdump $1 failed"
	echo "$dis" |
		awk -v f="$2" '$0 ~ "^[0-9a-f]+ <" f ">:$" { on = 1; next } on && /^$/ { exit } on' |
		sed -E 's/^ *[0-9a-f]+:\t//;
			s/[0-9a-f]{12,} <([^>]+)>/ADDR <\1>/g;
			s/[0-9a-f]{12,}/ADDR/g;
			s/-0x[4-7][0-9a-f]{7}\b/ADDR32/g;
			s/-?0x[0-9a-f]+\(%rip\)/DISP(%rip)/g;
			s/ +# .*$//'
}

address() {
	local syms
	syms=$(nm "$1") || die "nm $1 failed (a build relinking it?)"
	awk -v f="$2" '$3 == f { print $1; exit }' <<<"$syms"
}

same=0 differ=0 absent=0
for f in "${funcs[@]}"; do
	a=$(address "$ours" "$f")
	b=$(address "$stock" "$f")
	if [ -z "$a" ] || [ -z "$b" ]; then
		where=either
		if [ -n "$a" ]; then
			where=stock
		elif [ -n "$b" ]; then
			where=ours
		fi
		printf '  %-34s not a symbol in %s (inlined into its callers)\n' "$f" "$where"
		absent=$((absent + 1))
		continue
	fi
	ours_code=$(listing "$ours" "$f")
	stock_code=$(listing "$stock" "$f")
	n=$(grep -c . <<<"$ours_code")
	if [ "$ours_code" = "$stock_code" ]; then
		printf '  %-34s same %d instructions (ours at %s, stock at %s)\n' "$f" "$n" "$a" "$b"
		same=$((same + 1))
	else
		printf '  %-34s DIFFERS (ours %d instructions at %s, stock %d at %s):\n' "$f" "$n" "$a" \
			"$(grep -c . <<<"$stock_code")" "$b"
		diff -U2 --label stock --label ours <(echo "$stock_code") <(echo "$ours_code") | tail -n +3 | sed 's/^/      /' || true
		differ=$((differ + 1))
	fi
done
info "code-compare ($ARCH): $same same, $differ differ, $absent not symbols"
