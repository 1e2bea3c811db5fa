#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Turn one guest run's output directory into a per-test summary.

Reads, from OUT:
  dmesg.txt        the guest's kernel log (KUnit KTAP is parsed from it with
                   the tree's own tools/testing/kunit/kunit.py parse)
  test_progs.json  test_progs -J output (counts, failed tests), if they ran
  test_progs.log   its output, for the per-test result lines
  test_maps.rc/.log test_maps' exit code and output, if it ran (guest.env)
  console.log      the guest script's output and the kernel's console; used for
                   the splat scan and KUnit when dmesg.txt is missing
Writes OUT/kunit.json (kunit.py's JSON) and OUT/results.json (every test
with its status, plus every splat), prints the summary and ends with the line
"N passed, N failed, N skipped".

Any BUG, WARNING, KASAN, lockdep, RCU stall, Oops or panic line in the kernel
log is a failure, even when every test passed. Suites named with --expect
must have run.

Exit status: 0 when nothing failed, 1 otherwise.
"""

import argparse
import json
import os
import re
import subprocess
import sys

SPLAT_PATTERNS = [
    r"\bBUG: ",
    r"\bWARNING: ",
    r"KASAN: ",
    r"UBSAN: ",
    r"possible recursive locking detected",
    r"possible circular locking dependency",
    r"inconsistent lock state",
    r"suspicious RCU usage",
    r"rcu_(preempt|sched|tasks\w*) detected (expedited )?stalls?",
    r"INFO: rcu\w* (self-)?detected stall",
    r"INFO: task \S+ blocked for more than",
    r"\bOops\b",
    r"general protection fault",
    r"Kernel panic",
    r"kernel BUG at",
    r"Unable to handle kernel",
    r"soft lockup",
    r"hard LOCKUP",
    r"ODEBUG: ",
    r"list_(add|del) corruption",
]
SPLAT_RE = re.compile("|".join(SPLAT_PATTERNS))


def kunit_results(tree, dmesg, out):
    """Parse KTAP from dmesg with kunit.py; return [(suite, test, status)]."""
    kunit_py = os.path.join(tree, "tools/testing/kunit/kunit.py")
    jpath = os.path.join(out, "kunit.json")
    proc = subprocess.run(
        [sys.executable, kunit_py, "parse", dmesg, "--json=" + jpath],
        capture_output=True, text=True, check=False)
    with open(os.path.join(out, "kunit-parse.txt"), "w", encoding="utf-8") as f:
        f.write(proc.stdout + proc.stderr)
    if not os.path.exists(jpath):
        return [("kunit", "parse", "FAIL")]
    with open(jpath, encoding="utf-8") as f:
        root = json.load(f)

    rows = []

    def walk(group, prefix):
        for case in group.get("test_cases", []):
            rows.append((prefix, case["name"], case["status"]))
        for sub in group.get("sub_groups", []):
            name = sub["name"] if not prefix else prefix + "." + sub["name"]
            walk(sub, name)

    walk(root, "")
    return rows


# "#223     ls_defer_nmi:OK (SKIP: 1/3)": a test with skipped subtests.
RESULT_RE = re.compile(r"^#(\d+)(?:/(\d+))?\s+(\S+):(OK|SKIP|FAIL)(?: \(SKIP: \d+/\d+\))?$")


def test_progs_results(jpath, logpath):
    """test_progs: one row per subtest, or per test without subtests.

    test_progs -J lists only the failed tests (with their logs) and the
    counts, so the per-test statuses come from the result lines of its
    output ("#N[/M] name:OK|SKIP|FAIL"), and are checked against the JSON
    counts: any disagreement is a failure of its own.
    """
    with open(jpath, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
        partial = False
    except ValueError:
        # test_progs writes its JSON at exit: a guest that was cut off (hung
        # or crashed) leaves it empty or partial. Report what the log says.
        data, partial = {}, True
    status_of = {"OK": "PASS", "SKIP": "SKIP", "FAIL": "FAIL"}
    tops, subs = {}, {}
    if os.path.exists(logpath):
        with open(logpath, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = RESULT_RE.match(line.rstrip())
                if not m:
                    continue
                num, sub, name, st = m.groups()
                if sub is None:
                    tops[num] = (name, status_of[st])
                else:
                    # The error summary at the end repeats failed lines.
                    subs.setdefault(num, {})[sub] = (name, status_of[st])
    rows = []
    for num, (name, st) in tops.items():
        for sname, sst in subs.get(num, {}).values():
            rows.append(("test_progs", sname, sst))
        if not subs.get(num) or (st == "FAIL" and
                                 all(x[1] != "FAIL" for x in subs[num].values())):
            rows.append(("test_progs", name, st))
    # JSON "success" counts every test without errors (skipped ones too) and
    # "skipped" every test__skip() call, subtests included: compare the rest.
    top = [t[1] for t in tops.values()]
    want = (data.get("success", 0), data.get("failed", 0))
    have = (len(top) - top.count("FAIL"), top.count("FAIL"))
    if partial:
        rows.append(("test_progs", "wrote its JSON results (did it exit?)", "FAIL"))
    elif want != have:
        rows.append(("test_progs", f"log {have} agrees with JSON {want} (passed, failed)", "FAIL"))
    for test in data.get("results", []):
        if test.get("failed") and test["number"] is not None and str(test["number"]) not in tops:
            rows.append(("test_progs", test["name"], "FAIL"))
    return rows


def guest_env(out):
    """OUT/guest.env (written by run-vm.sh) as a dict, or None if there is none."""
    path = os.path.join(out, "guest.env")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)


def test_maps_results(out):
    """test_maps: one row for the run (TEST_MAPS in guest.env), from its exit code.

    test_maps exits at the first failed CHECK() with its message; on success
    its last line is "test_maps: OK, N SKIPPED".
    """
    which = (guest_env(out) or {}).get("TEST_MAPS", "0")
    if which == "0":
        return []
    name = "every map test" if which == "all" else which
    rc_path = os.path.join(out, "test_maps.rc")
    if not os.path.exists(rc_path):
        return [("test_maps", f"{name}: ran", "FAIL")]
    with open(rc_path, encoding="utf-8") as f:
        rc = f.read().strip()
    last = ""
    log = os.path.join(out, "test_maps.log")
    if os.path.exists(log):
        with open(log, encoding="utf-8", errors="replace") as f:
            lines = [ln.rstrip() for ln in f if ln.strip()]
        last = lines[-1] if lines else ""
    ok = rc == "0" and last.startswith("test_maps: OK")
    return [("test_maps", name if ok else f"{name}: exit {rc}: {last}", "PASS" if ok else "FAIL")]


def splats(path):
    found = []
    if not os.path.exists(path):
        return found
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if SPLAT_RE.search(line):
                found.append(line.rstrip())
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", required=True, help="kernel tree (for kunit.py)")
    ap.add_argument("--out", required=True, help="guest output directory")
    ap.add_argument("--expect", action="append", default=[],
                    help="a KUnit suite that must have run")
    ap.add_argument("--label", default="", help="label for the summary")
    args = ap.parse_args()

    rows = []
    dmesg = os.path.join(args.out, "dmesg.txt")
    log = dmesg if os.path.exists(dmesg) else os.path.join(args.out, "console.log")
    if os.path.exists(dmesg):
        rows += kunit_results(args.tree, dmesg, args.out)
    else:
        rows.append(("guest", "kernel log saved", "FAIL"))
        # A guest that hung saved no dmesg: its console has the kernel's log.
        if os.path.exists(log):
            rows += kunit_results(args.tree, log, args.out)
    ran = {r[0].split(".")[0] for r in rows}
    for suite in args.expect:
        if suite not in ran:
            rows.append((suite, "suite ran", "FAIL"))
    tp = os.path.join(args.out, "test_progs.json")
    if os.path.exists(tp):
        rows += test_progs_results(tp, os.path.join(args.out, "test_progs.log"))
    elif (guest_env(args.out) or {}).get("TEST_PROGS_ALLOW", ""):
        rows.append(("test_progs", "wrote its JSON results", "FAIL"))

    rows += test_maps_results(args.out)

    found = splats(log)
    for line in found:
        rows.append(("dmesg", line, "FAIL"))
    if not os.path.exists(os.path.join(args.out, "guest-done")):
        rows.append(("guest", "finished its script", "FAIL"))

    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    width = max((len(r[0]) for r in rows), default=10)
    print(f"== results {args.label}".rstrip())
    suite = None
    for s, name, status in rows:
        status = status if status in counts else "FAIL"
        counts[status] += 1
        if s != suite:
            suite = s
        if status != "PASS" or s not in ("dmesg",):
            print(f"  {status:4}  {s:{width}}  {name}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"label": args.label,
                   "results": [{"suite": s, "test": n, "status": st}
                               for s, n, st in rows],
                   "splats": found,
                   "passed": counts["PASS"], "failed": counts["FAIL"],
                   "skipped": counts["SKIP"]}, f, indent=2)
    if found:
        print(f"  {len(found)} splat line(s) in {log}: each counts as a failure")
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
