#!/usr/bin/env python3
"""Every peer in one benchmark (issue 23, item 5): one job-queue write (read a counter, insert
the job it numbers, store the counter, in one write transaction) through this crate, plain
Diesel, deadpool-diesel and sqlx, in real processes started together on a barrier.

Build (nothing is built here; the runner is a workspace of its own, bench/peers, outside the
library's build):

    cd bench/peers && cargo build --release     # honours CARGO_TARGET_DIR

Run (from the repository root; Python 3.11, standard library only):

    scripts/peers.py --rounds 5                  # table on stdout, bench/peers/results.json,
                                                 # docs/peers.svg (about 3 min a round)
    scripts/peers.py --rounds 1 --total 640      # a quick look (seconds)
    scripts/peers.py --replay bench/peers/results.json   # the table and plot again, no run

The binary is taken from --bin, else $CARGO_TARGET_DIR/release/peers-bench, else
bench/peers/target/release/peers-bench.

Cells: each runner in each shape. The peer table: 1, 4 and 16 processes with one writer each,
and 16 threads or tasks in one process, for every runner. The async table (issue item 3): this
crate's AsyncDatabase, deadpool-diesel with immediate_transaction and this crate's blocking
Database with as many OS threads, at 8, 16 and 64 writers in 1 and 4 processes. Every cell
writes --total writes (default 40,960) shared evenly by all its writers, on a fresh file
(created and migrated by `peers-bench init` before the children start), WAL and
synchronous=NORMAL for every runner, busy_timeout 5 s for the peers, this crate's defaults
otherwise. Each round runs every shape once, the runners of a shape one after the other,
their order rotated from round to round.

Measured: writes/s = acknowledged writes / wall time from the barrier's release to the last
exit; p50/p99/max latency of the acknowledged writes, from the call to its return (pool
checkout included); failures = writes that returned an error (the harness never retries;
a runner's own retries are part of its write; "database is locked" from the peers counts).
Medians over the rounds, each metric on its own; the "x" column is the median over the
rounds of the runner's writes/s over the baseline's in the same round. After every cell the file is checked:
counter = jobs = acknowledged writes."""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PEER_RUNNERS = ["crate", "crate-async", "diesel", "deadpool-immediate", "deadpool-deferred", "sqlx"]
PEER_SHAPES = [(1, 1), (4, 1), (16, 1), (1, 16)]
ASYNC_RUNNERS = ["crate-async", "deadpool-immediate", "crate"]
ASYNC_SHAPES = [(1, 8), (1, 16), (1, 64), (4, 8), (4, 16), (4, 64)]

LABELS = {
    "crate": "this crate, Database::write (threads)",
    "crate-async": "this crate, AsyncDatabase::write (tasks)",
    "diesel": "plain Diesel, immediate_transaction (threads)",
    "deadpool-immediate": "deadpool-diesel, immediate_transaction",
    "deadpool-deferred": "deadpool-diesel, transaction (deferred)",
    "sqlx": "sqlx, begin_with(\"BEGIN IMMEDIATE\")",
}


def shape_name(shape):
    procs, writers = shape
    if writers == 1:
        return f"{procs} process{'es' if procs > 1 else ''}"
    return f"{procs} x {writers} writers"


def binary_path(given):
    if given:
        return given
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "bench", "peers", "target")
    return os.path.join(target, "release", "peers-bench")


def quantile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def run_cell(binary, runner, procs, writers, writes, workdir):
    """One cell on a fresh file: returns its figures as a dict."""
    d = tempfile.mkdtemp(prefix="peers-", dir=workdir)
    try:
        db, barrier = os.path.join(d, "queue.db"), os.path.join(d, "go")
        subprocess.run([binary, "init", db], check=True, timeout=120)
        outs, errs, children = [], [], []
        for i in range(procs):
            out = open(os.path.join(d, f"out-{i}"), "w+")
            err = open(os.path.join(d, f"err-{i}"), "w+")
            outs.append(out)
            errs.append(err)
            children.append(subprocess.Popen(
                [binary, "run", runner, db, barrier, str(writers), str(writes)],
                stdout=out, stderr=err))
        ready_prefix = os.path.basename(barrier) + ".ready-"
        t0 = time.monotonic()
        while sum(1 for f in os.listdir(d) if f.startswith(ready_prefix)) < procs:
            if time.monotonic() - t0 > 120 or any(c.poll() is not None for c in children):
                break
            time.sleep(0.002)
        start = time.monotonic()
        open(barrier, "w").close()
        for c in children:
            try:
                c.wait(timeout=900)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
        seconds = time.monotonic() - start
        latencies, failures, ok, errors, crashed = [], 0, 0, {}, []
        for c, out, err in zip(children, outs, errs):
            out.seek(0)
            err.seek(0)
            lines = [line for line in out.read().splitlines() if line.startswith("{")]
            if c.returncode != 0 or not lines:
                failures += writers * writes
                crashed.append(err.read().strip()[-300:] or f"exit {c.returncode}")
                continue
            report = json.loads(lines[-1])
            ok += report["ok"]
            failures += report["failures"]
            latencies += report["lat_us"]
            for message, n in report["errors"].items():
                errors[message] = errors.get(message, 0) + n
        for f in outs + errs:
            f.close()
        checked = json.loads(subprocess.run([binary, "check", db], check=True, timeout=120,
                                            capture_output=True, text=True).stdout)
        latencies.sort()
        ms = lambda us: us / 1000
        return {
            "runner": runner, "processes": procs, "writers": writers, "writes_each": writes,
            "seconds": seconds, "ok": ok, "failures": failures,
            "writes_per_s": ok / seconds if seconds > 0 else 0.0,
            "p50_ms": ms(quantile(latencies, 0.5)), "p99_ms": ms(quantile(latencies, 0.99)),
            "max_ms": ms(latencies[-1]) if latencies else float("nan"),
            "errors": errors, "crashed": crashed,
            "consistent": checked["counter"] == checked["jobs"] == ok, "check": checked,
        }
    finally:
        shutil.rmtree(d, ignore_errors=True)


def cells():
    """(shape, runners) in the order a round runs them."""
    out = []
    for shape in PEER_SHAPES + [s for s in ASYNC_SHAPES if s not in PEER_SHAPES]:
        runners = PEER_RUNNERS if shape in PEER_SHAPES else ASYNC_RUNNERS
        out.append((shape, runners))
    return out


def median_of(runs, key):
    values = [r[key] for r in runs if not (isinstance(r[key], float) and math.isnan(r[key]))]
    return statistics.median(values) if values else float("nan")


def summarize(results):
    """{(procs, writers, runner): medians}"""
    grouped = {}
    for r in results:
        grouped.setdefault((r["processes"], r["writers"], r["runner"]), []).append(r)
    summary = {}
    for key, runs in grouped.items():
        errors = {}
        for r in runs:
            for message, n in r["errors"].items():
                errors[message] = errors.get(message, 0) + n
        summary[key] = {
            "rounds": len(runs),
            "writes_per_s": median_of(runs, "writes_per_s"),
            "p50_ms": median_of(runs, "p50_ms"), "p99_ms": median_of(runs, "p99_ms"),
            "max_ms": median_of(runs, "max_ms"), "failures": median_of(runs, "failures"),
            "attempts": runs[0]["processes"] * runs[0]["writers"] * runs[0]["writes_each"],
            "failures_per_round": [r["failures"] for r in runs],
            "writes_per_s_per_round": [round(r["writes_per_s"]) for r in runs],
            "errors": errors,
            "inconsistent_rounds": sum(1 for r in runs if not r["consistent"]),
        }
    return summary


def paired_ratio(results, shape, runner, baseline):
    """The median over rounds of the runner's writes/s over the baseline's in the same round
    (the two ran one after the other), which the machine's load drifts less than a ratio of
    medians."""
    rates = {}
    for r in results:
        if (r["processes"], r["writers"]) == shape and r["runner"] in (runner, baseline):
            rates.setdefault(r["round"], {})[r["runner"]] = r["writes_per_s"]
    ratios = [v[runner] / v[baseline] for v in rates.values()
              if runner in v and baseline in v and v[baseline] > 0]
    return statistics.median(ratios) if ratios else float("nan")


def table(summary, results, shapes, runners, baseline):
    lines = [f"| shape | runner | writes/s | x {baseline} | p50 ms | p99 ms | max ms | failures |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        for runner in runners:
            s = summary.get((*shape, runner))
            if not s:
                continue
            ratio = paired_ratio(results, shape, runner, baseline)
            fails = f"{s['failures']:.0f} of {s['attempts']}"
            if s["inconsistent_rounds"]:
                fails += f" (check failed in {s['inconsistent_rounds']} rounds)"
            lines.append(f"| {shape_name(shape)} | {runner} | {s['writes_per_s']:,.0f} | {ratio:.2f} | "
                         f"{s['p50_ms']:.2f} | {s['p99_ms']:.1f} | {s['max_ms']:.0f} | {fails} |")
    return "\n".join(lines)


# The plot: grouped bars of median writes/s, one panel per table, drawn by hand as in
# scripts/plots.py.
COLORS = {"crate": "#1f77b4", "crate-async": "#17becf", "diesel": "#2ca02c",
          "deadpool-immediate": "#ff7f0e", "deadpool-deferred": "#d62728", "sqlx": "#9467bd"}
W, PANEL_H, L, R, T, B = 820, 360, 75, 20, 95, 45


def panel(top, title, summary, shapes, runners):
    values = [summary[(*s, r)]["writes_per_s"] for s in shapes for r in runners if (*s, r) in summary]
    vmax = max(values + [1]) * 1.12
    step = 10 ** int(math.log10(vmax))
    step = step / 2 if vmax / step < 4 else step
    plot_top, plot_bottom = top + T, top + PANEL_H - B
    y = lambda v: plot_bottom - v / vmax * (plot_bottom - plot_top)
    s = f'<text x="{W / 2}" y="{top + 22}" text-anchor="middle" font-size="14">{title}</text>\n'
    for i, runner in enumerate(runners):  # legend, two columns
        lx, ly = L + 10 + (i % 2) * 370, top + 42 + 17 * (i // 2)
        s += f'<rect x="{lx}" y="{ly - 10}" width="14" height="11" fill="{COLORS[runner]}"/>\n'
        s += f'<text x="{lx + 20}" y="{ly}">{LABELS[runner]}</text>\n'
    s += f'<rect x="{L}" y="{plot_top}" width="{W - L - R}" height="{plot_bottom - plot_top}" fill="none" stroke="#444"/>\n'
    v = 0.0
    while v <= vmax:
        s += f'<line x1="{L}" y1="{y(v):.1f}" x2="{W - R}" y2="{y(v):.1f}" stroke="#ddd"/>\n'
        s += f'<text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:,.0f}</text>\n'
        v += step
    s += (f'<text x="16" y="{(plot_top + plot_bottom) / 2}" text-anchor="middle" '
          f'transform="rotate(-90 16 {(plot_top + plot_bottom) / 2})">writes per second (median)</text>\n')
    group = (W - L - R) / len(shapes)
    bar = group * 0.8 / len(runners)
    for g, shape in enumerate(shapes):
        gx = L + g * group + group * 0.1
        for i, runner in enumerate(runners):
            cell = summary.get((*shape, runner))
            if not cell:
                continue
            x, top_y = gx + i * bar, y(cell["writes_per_s"])
            s += (f'<rect x="{x:.1f}" y="{top_y:.1f}" width="{bar * 0.9:.1f}" '
                  f'height="{plot_bottom - top_y:.1f}" fill="{COLORS[runner]}"/>\n')
            if cell["failures"] > 0:
                pct = 100 * cell["failures"] / cell["attempts"]
                s += (f'<text x="{x + bar * 0.45:.1f}" y="{top_y - 4:.1f}" text-anchor="middle" '
                      f'font-size="9" fill="#d62728">{pct:.0f}%&#10007;</text>\n')
        s += (f'<text x="{L + g * group + group / 2:.1f}" y="{plot_bottom + 16}" '
              f'text-anchor="middle">{shape_name(shape)}</text>\n')
    s += (f'<text x="{W - R}" y="{plot_bottom + 34}" text-anchor="end" fill="#666">'
          f'N%&#10007;: median share of writes that failed</text>\n')
    return s


def plot(path, summary, total, rounds):
    body = panel(0, f"Job queue, {total} writes per cell: every peer (median of {rounds} rounds)",
                 summary, PEER_SHAPES, PEER_RUNNERS)
    body += panel(PANEL_H, "Async: tasks against threads and deadpool-diesel", summary,
                  ASYNC_SHAPES, ASYNC_RUNNERS)
    height = 2 * PANEL_H
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
                f'font-family="sans-serif" font-size="12">\n'
                f'<rect width="{W}" height="{height}" fill="white"/>\n{body}</svg>\n')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--total", type=int, default=40960,
                        help="writes per cell, shared evenly by its writers (default 40960)")
    parser.add_argument("--bin", help="the peers-bench binary")
    parser.add_argument("--dir", help="where the database files go (default: the temp dir)")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "peers", "results.json"))
    parser.add_argument("--svg", default=os.path.join(ROOT, "docs", "peers.svg"))
    parser.add_argument("--replay", help="no runs: the table and the plot again from a JSON file "
                        "this script wrote (its rounds and total)")
    args = parser.parse_args()
    results, began = [], time.time()
    if args.replay:
        with open(args.replay) as f:
            replayed = json.load(f)
        results, args.rounds, args.total = replayed["runs"], replayed["rounds"], replayed["total"]
    else:
        binary = binary_path(args.bin)
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary} not found: cd bench/peers && cargo build --release")
    for rnd in range(0 if args.replay else args.rounds):
        round_began = time.time()
        for shape, runners in cells():
            procs, writers = shape
            writes = max(1, args.total // (procs * writers))
            k = rnd % len(runners)
            for runner in runners[k:] + runners[:k]:
                r = run_cell(binary, runner, procs, writers, writes, args.dir)
                r["round"] = rnd
                results.append(r)
                print(f"round {rnd + 1} {shape_name(shape):18} {runner:19} {r['writes_per_s']:8,.0f} w/s "
                      f"p50 {r['p50_ms']:7.2f} p99 {r['p99_ms']:8.1f} max {r['max_ms']:7.0f} ms "
                      f"failures {r['failures']}{'' if r['consistent'] else ' CHECK FAILED'}"
                      f"{' crashed: ' + repr(r['crashed'][:1]) if r['crashed'] else ''}",
                      file=sys.stderr, flush=True)
        print(f"round {rnd + 1}: {time.time() - round_began:.0f} s", file=sys.stderr, flush=True)

    summary = summarize(results)
    machine = replayed["machine"] if args.replay else (
        f"{os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.1f}; "
        f"{args.rounds} rounds, {time.time() - began:.0f} s in all")
    print(f"## Every peer (median of {args.rounds} rounds; {args.total} writes per cell)\n")
    print(table(summary, results, PEER_SHAPES, PEER_RUNNERS, "crate"))
    print(f"\n## Async (median of {args.rounds} rounds; {args.total} writes per cell)\n")
    print(table(summary, results, ASYNC_SHAPES, ASYNC_RUNNERS, "crate-async"))
    print(f"\n{machine}")
    errors = {}
    for (_, _, runner), s in summary.items():
        for message, n in s["errors"].items():
            errors.setdefault(runner, {}).setdefault(message, 0)
            errors[runner][message] += n
    for runner, messages in sorted(errors.items()):
        print(f"- {runner} failures, all rounds: " +
              "; ".join(f"{n} x {m!r}" for m, n in sorted(messages.items(), key=lambda e: -e[1])))

    with open(args.json, "w") as f:
        json.dump({"rounds": args.rounds, "total": args.total, "machine": machine,
                   "summary": [{"processes": p, "writers": w, "runner": r, **s}
                               for (p, w, r), s in sorted(summary.items())],
                   "runs": results}, f, indent=1)
    plot(args.svg, summary, args.total, args.rounds)
    print(f"\nwrote {os.path.relpath(args.json, ROOT)} and {os.path.relpath(args.svg, ROOT)}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
