#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Compare our kernel's results with the stock kernel's (BASELINE=1).

Reads OURS/results.json and BASE/results.json (written by report.py) and
prints one row per test with both statuses. Fails when a test passes on the
stock kernel and does not on ours (a regression), or when either guest did not
finish. Tests that exist only in our run (the engine's KUnit suite, our new
selftests) show "-" for stock; our new selftests are expected to fail on stock
where they test what stock refuses (deletes from NMI programs).

Ends with "N passed, N failed, N skipped" for OUR run, where each regression
counts as one more failure; the runs of our kernel given with --extra (another
guest shape, such as 4 vCPUs) add their counts, and a run that left no results
counts as one failure.
"""

import argparse
import json
import sys


def load(path):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rows = {}
    for r in data["results"]:
        if r["suite"] == "dmesg":
            continue
        rows[(r["suite"], r["test"])] = r["status"]
    return data, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=RESULTS",
                    help="another run of our kernel whose counts add to the total")
    args = ap.parse_args()

    ours, orows = load(args.ours)
    base, brows = load(args.base)

    keys = list(orows) + [k for k in brows if k not in orows]
    width = max((len(f"{s} {t}") for s, t in keys), default=20)
    print(f"== ours vs stock (BASELINE=1)\n  {'test':{width}}  {'ours':5} {'stock':5}")
    regressions = []
    for key in keys:
        o = orows.get(key, "-")
        b = brows.get(key, "-")
        mark = ""
        if b == "PASS" and o != "PASS":
            mark = "  <- regression"
            regressions.append(key)
        print(f"  {key[0] + ' ' + key[1]:{width}}  {o:5} {b:5}{mark}")
    for side, data in (("ours", ours), ("stock", base)):
        if data.get("splats"):
            print(f"  {side}: {len(data['splats'])} splat line(s) in dmesg")
    infra = [k for k, v in brows.items() if k[0] == "guest" and v != "PASS"]
    if infra:
        print("  the stock kernel's guest did not finish: no baseline")

    passed, failed, skipped = ours["passed"], ours["failed"], ours["skipped"]
    failed += len(regressions) + len(infra)
    if regressions:
        print(f"  {len(regressions)} test(s) pass on stock and not on ours")
    for extra in args.extra:
        label, sep, path = extra.partition("=")
        if not sep or not label or not path:
            print(f"error: --extra {extra!r} is not LABEL=RESULTS", file=sys.stderr)
            return 2
        try:
            data, _ = load(path)
        except (OSError, ValueError) as e:
            print(f"== ours, {label}: no results ({e})")
            failed += 1
            continue
        print(f"== ours, {label}: {data['passed']} passed, {data['failed']} failed, "
              f"{data['skipped']} skipped")
        passed += data["passed"]
        failed += data["failed"]
        skipped += data["skipped"]
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
