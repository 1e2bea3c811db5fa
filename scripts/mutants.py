#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Tabulate make mutants: which tests killed each engine mutation.

Reads results.json (written by report.py) of a run on the real engine and of
one run per mutant (make vmtest BROKEN=<id>, selftests/broken/gen.py), and
prints one row per mutant: the tests that failed on it (KUnit cases, test_progs
tests, dmesg splats, a guest that did not finish) or SURVIVED. A failure only
counts when the same test passed on the real engine. Writes the table as JSON
to --json if given. Fails if the real engine fails, if a run left no results,
if a mutant survived without an entry in the equivalence file, or if
a variant's run passed nothing at all (it did not build or boot: NOT RUN).

Usage: mutants.py --ours DIR --mutant ID=DIR [...] [--equivalent FILE] [--json OUT]
"""

import argparse
import json
import os
import re
import sys


def load(outdir):
    path = os.path.join(outdir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def failures(data):
    """Names of what failed in a run: suite.case for KUnit, test/subtest otherwise."""
    out = []
    for r in data["results"]:
        if r["status"] != "FAIL":
            continue
        if r["suite"] == "dmesg":
            out.append("dmesg: " + r["test"][:60])
        elif r["suite"] == "guest":
            out.append("guest: " + r["test"])
        elif r["suite"] in ("test_progs", "test_maps"):
            out.append(r["test"])
        else:
            out.append(f"{r['suite']}.{r['test']}")
    return out


def equivalents(path):
    """Mutant ids argued equivalent: lines '- mID: argument' in the file."""
    if not path or not os.path.exists(path):
        return {}
    eq = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            # Known survivors that are real bugs are listed after this heading:
            # they are not equivalent, and stay SURVIVED.
            if line.startswith("## Known survivors"):
                break
            m = re.match(r"^- \*\*(\w+)\*\*", line)
            if m:
                eq[m.group(1)] = line.strip()
    return eq


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", required=True, help="out dir of the run on the real engine")
    ap.add_argument("--mutant", action="append", default=[], metavar="ID=DIR")
    ap.add_argument("--equivalent", help="markdown file with '- **ID**: argument' lines")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args()

    base = load(args.ours)
    if base is None:
        print(f"no results for the real engine in {args.ours}")
        return 1
    base_fail = set(failures(base))
    eq = equivalents(args.equivalent)
    rows = []
    bad = 0
    print("== make mutants: the engine's single-point breaks against the tests")
    print(f"  {'real engine':12} {'passes' if not base_fail else 'FAILS: ' + ', '.join(sorted(base_fail))}")
    bad += bool(base_fail)
    for spec in args.mutant:
        mid, sep, outdir = spec.partition("=")
        if not sep:
            ap.error(f"--mutant {spec}: want ID=DIR")
        data = load(outdir)
        if data is None:
            verdict, killers = "NO RESULTS", []
            bad += 1
        elif data.get("passed", 0) == 0:
            # Nothing passed: the variant did not build or boot (a broken
            # edit), which says nothing about the tests.
            verdict, killers = "NOT RUN", [f for f in failures(data) if f not in base_fail][:2]
            bad += 1
        else:
            killers = [f for f in failures(data) if f not in base_fail]
            if killers:
                verdict = "killed"
            elif mid in eq:
                verdict = "survived (argued equivalent)"
            else:
                verdict = "SURVIVED"
                bad += 1
        rows.append({"id": mid, "verdict": verdict, "killed_by": killers,
                     "label": (data or {}).get("label", "")})
        shown = ", ".join(killers[:4]) + (f" (+{len(killers) - 4})" if len(killers) > 4 else "")
        print(f"  {mid:12} {verdict:12} {shown}")
    killed = sum(r["verdict"] == "killed" for r in rows)
    print(f"{killed} of {len(rows)} mutants killed, "
          f"{sum(r['verdict'].startswith('survived') for r in rows)} argued equivalent, "
          f"{bad} not accounted for")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "base_failures": sorted(base_fail)}, f, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
