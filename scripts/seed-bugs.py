#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Tabulate the new selftests against the seed patch's three bugs.

Reads results.json (written by report.py) of a run on the real engine and of
one run per broken variant (make vmtest BROKEN=<n>, selftests/broken/), and
prints, per run, the status of each new test (ls_defer_*; subtests folded into
their test) and the dmesg splats. Fails when the real engine fails a new test,
or when a variant's bug is not caught: none of the tests written for it
failed and dmesg shows no splat.

Usage: seed-bugs.py --ours DIR --broken N=DIR [--broken N=DIR ...]
"""

import argparse
import json
import os
import sys

# Which bug each variant puts back, and which tests are written to catch it.
VARIANTS = {
    "1": ("plain per-CPU list (hlist_add_head() shape)",
          ("ls_defer_hardirq", "ls_defer_nmi")),
    "2": ("regular RCU instead of Tasks Trace RCU",
          ("ls_defer_sleepable",)),
    "3": ("no wait for the engine at map free",
          ("ls_defer_map_free",)),
}
TESTS = ("ls_defer_nmi", "ls_defer_hardirq", "ls_defer_sleepable", "ls_defer_map_free",
         "ls_defer_hotplug")


def load(outdir):
    """Per new test: FAIL if any of its rows failed, else PASS if one passed, else SKIP."""
    path = os.path.join(outdir, "results.json")
    if not os.path.exists(path):
        return None, 0
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    status = {}
    for r in data["results"]:
        if r["suite"] != "test_progs":
            continue
        name = r["test"].split("/", 1)[0]
        if name not in TESTS:
            continue
        prev = status.get(name)
        if r["status"] == "FAIL" or prev == "FAIL":
            status[name] = "FAIL"
        elif r["status"] == "PASS" or prev == "PASS":
            status[name] = "PASS"
        else:
            status[name] = "SKIP"
    return status, len(data.get("splats") or [])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", required=True, help="out dir of the run on the real engine")
    ap.add_argument("--broken", action="append", default=[], metavar="N=DIR",
                    help="out dir of the run with BROKEN=N")
    args = ap.parse_args()

    runs = [("real engine", args.ours, None)]
    for spec in args.broken:
        n, sep, outdir = spec.partition("=")
        if not sep or n not in VARIANTS:
            ap.error(f"--broken {spec}: want N=DIR with N in {', '.join(VARIANTS)}")
        runs.append((f"BROKEN={n}", outdir, n))

    short = [t[len("ls_defer_"):] for t in TESTS]
    width = max(len(s) for s in short)
    print("== the new selftests against the seed patch's bugs (selftests/broken/)")
    print(f"  {'run':12} " + " ".join(f"{s:>{width}}" for s in short) + "  splats  verdict")
    bad = 0
    for label, outdir, n in runs:
        status, nsplats = load(outdir)
        if status is None:
            print(f"  {label:12} no results in {outdir}")
            bad += 1
            continue
        cells = " ".join(f"{status.get(t, '-'):>{width}}" for t in TESTS)
        if n is None:
            ok = all(status.get(t) in ("PASS", "SKIP") for t in TESTS) and not nsplats
            verdict = "passes" if ok else "FAILS on the real engine"
        else:
            what, tests = VARIANTS[n]
            caught = [t for t in tests if status.get(t) == "FAIL"]
            ok = bool(caught) or nsplats > 0
            verdict = (f"{what}: caught by {', '.join(caught) or 'dmesg'}" if ok
                       else f"{what}: NOT caught")
        bad += not ok
        print(f"  {label:12} {cells}  {nsplats:6}  {verdict}")
    print(f"{len(runs) - bad} as expected, {bad} not")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
