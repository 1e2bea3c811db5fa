#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Compare the perf profiles of make bench's BENCH_PROFILE runs, stock against ours.

For every workload profiled on both kernels (raw/<kernel>-<n>cpu/perf/<id>.txt,
perf report --sort sym), prints the share of the busy samples (all but the
idle loop) of the symbols that weigh most in either kernel.

Usage: scripts/bench-profile-compare.py [--top N] RAW_DIR
"""
import argparse
import pathlib
import re
import sys

IDLE = {"pv_native_safe_halt", "default_idle", "cpu_idle_poll", "arch_cpu_idle"}
LINE = re.compile(r"\s+([\d.]+)%\s+\[k\]\s+(\S+)")


def load(path):
    """Symbol -> percent of all samples."""
    shares = {}
    for line in path.read_text().splitlines():
        m = LINE.match(line)
        if m:
            shares[m.group(2)] = float(m.group(1))
    return shares


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", type=pathlib.Path, help="out/bench/raw of a make bench run")
    ap.add_argument("--top", type=int, default=12, help="symbols per workload")
    args = ap.parse_args()
    found = 0
    for stock_dir in sorted(args.raw.glob("baseline-*cpu")):
        ours_dir = args.raw / stock_dir.name.replace("baseline-", "lsdefer-", 1)
        for stock_txt in sorted((stock_dir / "perf").glob("*.txt")):
            ours_txt = ours_dir / "perf" / stock_txt.name
            if not ours_txt.exists():
                continue
            found += 1
            b, o = load(stock_txt), load(ours_txt)
            b_busy = 100 - sum(v for k, v in b.items() if k in IDLE)
            o_busy = 100 - sum(v for k, v in o.items() if k in IDLE)
            if b_busy <= 0 or o_busy <= 0:
                print(f"== {stock_txt.stem}: no busy samples", file=sys.stderr)
                continue
            print(f"== {stock_dir.name.split('-', 1)[1]} {stock_txt.stem}: busy "
                  f"{b_busy:.1f}% of stock's samples, {o_busy:.1f}% of ours'")
            syms = sorted((set(b) | set(o)) - IDLE, key=lambda s: -(b.get(s, 0) + o.get(s, 0)))
            for s in syms[:args.top]:
                print(f"  {s:44s} stock {100 * b.get(s, 0) / b_busy:5.1f}%"
                      f"  ours {100 * o.get(s, 0) / o_busy:5.1f}%  of busy")
    if not found:
        sys.exit(f"error: no workload profiled on both kernels under {args.raw} (BENCH_PROFILE)")


if __name__ == "__main__":
    main()
