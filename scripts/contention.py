#!/usr/bin/env python3
"""Contention: N processes x K writes holding H ms, started together on a fresh file, for each
mode given; reports failures and the wait percentiles (wait_us from `record --json`) against
the fair value N x H. Build first: cargo build --release.
usage: scripts/contention.py [N K H] (default 32 20 10)"""
import json, os, subprocess, sys, tempfile, time, statistics
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = os.path.join(root, "target", "release", "sqlite-persistence")
n, k, h = (int(a) for a in (sys.argv[1:4] if len(sys.argv) >= 4 else (32, 20, 10)))
modes = {"fair queue": [], "no fair queue": ["--no-fair-queue"]}
for label, extra in modes.items():
    d = tempfile.mkdtemp(); db = os.path.join(d, "c.db"); barrier = os.path.join(d, "go")
    cmd = [binary, "record", "--db", db, "--barrier", barrier, "--artifact", "a", "--count", str(k),
           "--hold-ms", str(h), "--json"] + extra
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(n)]
    t0 = time.time()
    while sum(1 for f in os.listdir(d) if ".ready-" in f) < n:
        if time.time() - t0 > 60: sys.exit("children not ready")
        time.sleep(0.005)
    start = time.time(); open(barrier, "w").close()
    waits, failed = [], 0
    for p in procs:
        out, err = p.communicate(timeout=300)
        waits += [json.loads(l)["wait_us"] / 1000 for l in out.decode().splitlines()]
        failed += p.returncode != 0
    took = time.time() - start
    waits.sort()
    q = lambda p: waits[min(len(waits) - 1, int(p * len(waits)))] if waits else float("nan")
    print(f"{label:14} failed processes {failed}/{n}, writes {len(waits)}/{n*k}; wait ms p50 {q(.5):.0f} "
          f"p99 {q(.99):.0f} max {waits[-1] if waits else float('nan'):.0f} (fair {n*h}); "
          f"{len(waits)/took:.0f} writes/s")
