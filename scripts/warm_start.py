#!/usr/bin/env python3
"""Warm start: one process on an already-migrated database, from start to its first committed
write (the whole `record --count 1` process), this crate against two baselines: the plain
Diesel setup (r2d2 pool, `record --plain`) and the lean one a careful user writes by hand
(one connection, `immediate_transaction`, `record --lean`). Runs alternate so that machine
noise hits all; prints medians and the ratio to the faster baseline.
Build first: cargo build --release. usage: scripts/warm_start.py [RUNS] (default 40)"""
import os, statistics, subprocess, sys, tempfile, time
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = os.path.join(root, "target", "release", "sqlite-persistence")
runs = int(sys.argv[1]) if len(sys.argv) > 1 else 40
d = tempfile.mkdtemp()
dbs = {"sqlite-persistence": os.path.join(d, "layer.db"), "plain diesel": os.path.join(d, "plain.db"),
       "lean diesel": os.path.join(d, "lean.db")}
extra = {"sqlite-persistence": [], "plain diesel": ["--plain"], "lean diesel": ["--lean"]}
for label, db in dbs.items():  # migrate both first: this measures warm starts only
    subprocess.run([binary, "record", "--db", db, "--artifact", "w"] + extra[label], check=True, capture_output=True)
times = {label: [] for label in dbs}
for _ in range(runs):
    for label, db in dbs.items():
        start = time.perf_counter()
        subprocess.run([binary, "record", "--db", db, "--artifact", "w"] + extra[label], check=True, capture_output=True)
        times[label].append((time.perf_counter() - start) * 1000)
med = {label: statistics.median(t) for label, t in times.items()}
best = min(("plain diesel", "lean diesel"), key=lambda label: med[label])
print(f"warm start to first committed write (median of {runs}): sqlite-persistence "
      f"{med['sqlite-persistence']:.2f} ms, plain diesel {med['plain diesel']:.2f} ms, "
      f"lean diesel {med['lean diesel']:.2f} ms; ratio to the faster ({best}) "
      f"{med['sqlite-persistence'] / med[best]:.3f}")
