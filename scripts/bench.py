#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Aggregate make bench's runs into a table, results.json and a chart.

Reads the JSON lines scripts/guest/run-bench.sh wrote (one per run: kernel,
cpus, workload, metrics) and, per vCPU count, workload and kernel, takes the
median, min and max over the runs of every figure; the ratio ours/stock is
the ratio of the medians, its error bar runs from ours' min over stock's max
to ours' max over stock's min. Writes OUT/results.json and OUT/table.md,
prints the tables, and draws OUT/ratios.png (matplotlib, from the harness
venv) unless --no-chart. --readme FILE replaces the text between
"<!-- bench:begin -->" and "<!-- bench:end -->" in FILE with the tables, the
date of the run and the chart (copied next to FILE as --readme-chart), so
that the README's figures come from this code, never from a hand edit.

Kernels: "lsdefer" is ours, "baseline" the stock kernel. A workload stock
refuses (deletes from NMI: every delete -EOPNOTSUPP) has no ratio.
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys

OURS, STOCK = "lsdefer", "baseline"
KERNEL_NAMES = {OURS: "ours", STOCK: "stock"}

# (key in metrics, dotted for nested; label; only on our kernel)
FIGURES = [
    ("ops_per_sec", "ops/s", False),
    ("srcu_calls_per_op", "call_rcu_tasks_trace()/op", False),
    ("gps_per_op", "Tasks Trace GPs/op", False),
    ("lat_p50_us", "delete-to-free p50 (us)", False),
    ("lat_p99_us", "delete-to-free p99 (us)", False),
    ("peak_pending", "peak pending deleted values", False),
    ("map_close_p50_us", "map close-to-free p50 (us)", False),
    ("map_close_p99_us", "map close-to-free p99 (us)", False),
    ("engine.gps_per_op", "engine GPs/op", True),
    ("engine.peak_pending", "engine peak pending objects", True),
    ("engine.peak_pending_bytes", "engine peak pending bytes", True),
    ("engine.peak_pending_first_half", "engine peak pending objects, 1st half", True),
    ("engine.peak_pending_second_half", "engine peak pending objects, 2nd half", True),
]
# Figures of the free-path table (the ls-defer-* benchmarks), in its columns
FREE_PATH = [
    ("srcu_calls_per_op", "rcu_tt/op"),
    ("gps_per_op", "GPs/op"),
    ("lat_p50_us", "free p50 us"),
    ("lat_p99_us", "free p99 us"),
    ("peak_pending", "peak pending"),
    ("engine.peak_pending", "engine peak objs"),
    ("engine.peak_pending_bytes", "engine peak bytes"),
    ("map_close_p50_us", "map close p50 us"),
    ("map_close_p99_us", "map close p99 us"),
]


def die(msg):
    print(f"bench.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def get(metrics, key):
    """metrics[key], key dotted for nested objects; None if absent or null."""
    v = metrics
    for part in key.split("."):
        if not isinstance(v, dict) or v.get(part) is None:
            return None
        v = v[part]
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def load(paths):
    """Every run line of every file, checked; accel of each raw dir."""
    runs, accel = [], {}
    need = ("kernel", "cpus", "workload", "run", "ok")
    for path in paths:
        try:
            f = open(path, encoding="utf-8")
        except OSError as e:
            die(f"cannot read {path}: {e.strerror}")
        with f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    die(f"{path}:{n}: not JSON ({e.msg})")
                missing = [k for k in need if k not in r]
                if missing:
                    die(f"{path}:{n}: no {', '.join(missing)}")
                if r["kernel"] not in KERNEL_NAMES:
                    die(f"{path}:{n}: unknown kernel {r['kernel']!r} (want {OURS} or {STOCK})")
                r["_src"] = path
                runs.append(r)
        acc = os.path.join(os.path.dirname(path), "accel")
        if os.path.exists(acc):
            with open(acc, encoding="utf-8") as f:
                accel[path] = f.read().strip()
    if not runs:
        die("no runs in " + ", ".join(paths))
    return runs, accel


def summary(values):
    if not values:
        return None
    return {
        "n": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def refused(runs):
    """Every run had its deletes refused and did none (stock, from NMI)."""
    ms = [r["metrics"] for r in runs if r["ok"] and r.get("metrics")]
    return bool(ms) and all((get(m, "del_refused") or 0) > 0 and not get(m, "del_ok")
                            for m in ms)


def aggregate(runs, min_runs):
    groups = {}
    order = []
    for r in runs:
        key = (r["cpus"], r["workload"])
        if key not in groups:
            groups[key] = {OURS: [], STOCK: [], "bench": r.get("bench", ""),
                           "args": r.get("args", "")}
            order.append(key)
        groups[key][r["kernel"]].append(r)
    cells = []
    for cpus, workload in sorted(order, key=lambda k: (k[0], order.index(k))):
        g = groups[(cpus, workload)]
        cell = {"cpus": cpus, "workload": workload, "bench": g["bench"],
                "args": g["args"], "figures": {}, "notes": []}
        for kernel in (STOCK, OURS):
            ok = [r for r in g[kernel] if r["ok"]]
            cell[kernel + "_runs"] = len(g[kernel])
            cell[kernel + "_failed"] = len(g[kernel]) - len(ok)
            if g[kernel] and len(ok) < len(g[kernel]):
                cell["notes"].append(f"{KERNEL_NAMES[kernel]}: {len(g[kernel]) - len(ok)} "
                                     f"of {len(g[kernel])} runs failed")
            if not g[kernel]:
                cell["notes"].append(f"no {KERNEL_NAMES[kernel]} runs")
            elif len(ok) < min_runs:
                cell["notes"].append(f"{KERNEL_NAMES[kernel]}: {len(ok)} runs (< {min_runs})")
        cell["stock_refuses"] = refused(g[STOCK])
        if cell["stock_refuses"]:
            cell["notes"].append("stock refuses (deletes from NMI: -EOPNOTSUPP)")
        for key, label, ours_only in FIGURES:
            fig = {"label": label}
            for kernel in (STOCK, OURS):
                if ours_only and kernel == STOCK:
                    continue
                vals = [get(r["metrics"], key) for r in g[kernel] if r["ok"] and r.get("metrics")]
                fig[kernel] = summary([v for v in vals if v is not None])
            fig.update(ratio(fig.get(OURS), fig.get(STOCK), cell["stock_refuses"]))
            if fig.get(OURS) or fig.get(STOCK):
                cell["figures"][key] = fig
        cells.append(cell)
    return cells


def ratio(ours, stock, stock_refuses):
    if not ours or not stock or stock_refuses or stock["median"] <= 0:
        return {"ratio": None, "ratio_min": None, "ratio_max": None}
    return {
        "ratio": ours["median"] / stock["median"],
        "ratio_min": ours["min"] / stock["max"] if stock["max"] > 0 else None,
        "ratio_max": ours["max"] / stock["min"] if stock["min"] > 0 else None,
    }


def human(v):
    if v is None:
        return "-"
    a = abs(v)
    # 999.96k shows as 1M, not 1e+03k
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if float(f"{a:.3g}") >= div:
            return f"{v / div:.3g}{suffix}"
    if a == 0 or a >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


def med_range(s):
    if not s:
        return "-"
    return f"{human(s['median'])} [{human(s['min'])}, {human(s['max'])}]"


def table_ops(cells):
    lines = ["| vCPUs | workload | stock ops/s median [min, max] | "
             "ours ops/s median [min, max] | ours/stock [range] | notes |",
             "| ---: | --- | ---: | ---: | ---: | --- |"]
    for c in cells:
        f = c["figures"].get("ops_per_sec", {})
        if c["stock_refuses"]:
            stock, rat = "refused", "n/a"
        else:
            stock = med_range(f.get(STOCK))
            rat = "-" if f.get("ratio") is None else (
                f"{f['ratio']:.2f} [{human(f['ratio_min'])}, {human(f['ratio_max'])}]")
        lines.append(f"| {c['cpus']} | {c['workload']} | {stock} | {med_range(f.get(OURS))} "
                     f"| {rat} | {'; '.join(c['notes'])} |")
    return lines


def table_free_path(cells):
    head = "| vCPUs | workload | kernel | " + " | ".join(h for _, h in FREE_PATH) + " |"
    lines = [head, "| ---: | --- | --- |" + " ---: |" * len(FREE_PATH)]
    for c in cells:
        if not c["bench"].startswith("ls-defer-"):
            continue
        for kernel in (STOCK, OURS):
            row = []
            for key, _ in FREE_PATH:
                s = c["figures"].get(key, {}).get(kernel)
                row.append(human(s["median"]) if s else "-")
            lines.append(f"| {c['cpus']} | {c['workload']} | {KERNEL_NAMES[kernel]} | "
                         + " | ".join(row) + " |")
    return lines


def chart(cells, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        die("matplotlib is not installed in this Python: run 'make setup' "
            "(it goes into the harness venv), or pass --no-chart")
    cpus = sorted({c["cpus"] for c in cells})
    rows = {n: [c for c in cells if c["cpus"] == n
                and c["figures"].get("ops_per_sec", {}).get("ratio") is not None]
            for n in cpus}
    height = max(len(r) for r in rows.values()) if rows else 1
    fig, axes = plt.subplots(1, len(cpus), figsize=(6 * len(cpus), 1.2 + 0.32 * max(height, 1)),
                             squeeze=False, sharex=True)
    for ax, n in zip(axes[0], cpus):
        rs = rows[n]
        y = list(range(len(rs)))
        mid = [c["figures"]["ops_per_sec"]["ratio"] for c in rs]
        lo = [m - (c["figures"]["ops_per_sec"]["ratio_min"] or m) for m, c in zip(mid, rs)]
        hi = [(c["figures"]["ops_per_sec"]["ratio_max"] or m) - m for m, c in zip(mid, rs)]
        colors = ["tab:green" if m >= 1 else "tab:red" for m in mid]
        ax.barh(y, mid, xerr=[lo, hi], color=colors, alpha=0.75, capsize=3)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels([c["workload"] for c in rs], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{n} vCPUs")
        ax.set_xlabel("ops/s, ours / stock (median; bar: min/max over runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(readme, chart_rel, text):
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    try:
        with open(readme, encoding="utf-8") as f:
            s = f.read()
    except OSError as e:
        die(f"cannot read {readme}: {e.strerror}")
    if s.count(begin) != 1 or s.count(end) != 1 or s.index(begin) > s.index(end):
        die(f"{readme} must hold one '{begin}' ... '{end}' block")
    block = "\n".join([begin, "<!-- generated by scripts/bench.py: do not edit by hand -->", ""]
                      + text + ([f"![ours/stock ops/s ratios]({chart_rel})", ""]
                                if chart_rel else []) + [end])
    s = s[:s.index(begin)] + block + s[s.index(end) + len(end):]
    with open(readme, "w", encoding="utf-8") as f:
        f.write(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", nargs="+", help="bench.jsonl files of run-bench.sh")
    ap.add_argument("--out", required=True, help="directory for results.json, table.md, ratios.png")
    ap.add_argument("--min-runs", type=int, default=5,
                    help="runs per cell below which the table says so (default 5)")
    ap.add_argument("--no-chart", action="store_true", help="do not draw ratios.png")
    ap.add_argument("--readme", help="README to update between the bench markers")
    ap.add_argument("--readme-chart", default="docs/bench/ratios.png",
                    help="where the chart goes, relative to the README (default %(default)s)")
    args = ap.parse_args()
    if args.min_runs < 1:
        die("--min-runs must be at least 1")

    runs, accel = load(args.jsonl)
    cells = aggregate(runs, args.min_runs)
    mtime = max(os.path.getmtime(p) for p in args.jsonl)
    date = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc)
    accels = sorted(set(accel.values())) or ["unknown"]
    head = (f"Run of {date:%Y-%m-%d %H:%M} UTC: {len(runs)} runs "
            f"({sum(not r['ok'] for r in runs)} failed), vCPUs "
            f"{', '.join(str(n) for n in sorted({c['cpus'] for c in cells}))}, "
            f"accelerator {', '.join(accels)}; median [min, max] over the runs.")
    text = [head, "", "Throughput:", ""] + table_ops(cells)
    text += ["", "Free path (medians; rcu_tt: call_rcu_tasks_trace() calls; GPs: Tasks Trace "
             "grace periods; engine: its debugfs counters, ours only):", ""]
    text += table_free_path(cells) + [""]

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"generated": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "run_date": date.isoformat(), "accel": accels,
                   "min_runs": args.min_runs, "sources": args.jsonl,
                   "kernels": {OURS: "ours (deferred-free engine)", STOCK: "stock 7.3.4"},
                   "cells": cells}, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))

    png = None
    if not args.no_chart:
        png = os.path.join(args.out, "ratios.png")
        chart(cells, png)
        print(f"chart: {png}")
    if args.readme:
        rel = None
        if png:
            rel = args.readme_chart
            dst = os.path.join(os.path.dirname(os.path.abspath(args.readme)), rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(png, dst)
        update_readme(args.readme, rel, text)
        print(f"updated {args.readme}")
    bad = [c for c in cells if any("runs" in n for n in c["notes"])]
    if bad:
        print(f"warning: {len(bad)} cells with failed or too few runs (see notes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
