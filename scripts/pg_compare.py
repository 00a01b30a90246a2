#!/usr/bin/env python3
"""Two builds of the command line (`--features postgres`) on PostgreSQL, alternating in each
round on one throwaway server (initdb into a temporary directory, Unix socket only,
fsync=off; as the postgres user when run as root): a lone writer's rate (`record --count
3000`), 4 processes x 1,000 writes on one hot row, the cold storm (64 x 1) and the contention
(32 x 20 x 10 ms) of `stress`. Medians, and after/before ratios.
usage: scripts/pg_compare.py BEFORE_BINARY AFTER_BINARY [ROUNDS] (default 3)"""
import json, os, statistics, subprocess, sys, time

from pgserver import Server

bins = {"before": sys.argv[1], "after": sys.argv[2]}
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
server = Server("sp-pgcmp-")
base = server.url()


def lone(binary, r):
    db = f"lone_{r}_{time.time_ns()}"
    server.psql(f"CREATE DATABASE {db}")
    url = server.url(db)
    subprocess.run([binary, "migrate", "--db", url], check=True, capture_output=True)
    start = time.time()
    subprocess.run([binary, "record", "--db", url, "--artifact", "a", "--count", "3000"], check=True,
                   capture_output=True)
    return {"writes_per_second": 3000 / (time.time() - start)}


def stress(binary, n, k, h):
    out = subprocess.run([binary, "stress", "--json", "--db", base, "--processes", str(n), "--writes",
                          str(k), "--hold-ms", str(h)], capture_output=True, text=True, timeout=900)
    return json.loads(out.stdout)["sides"][0]


loads = {
    "lone writer, 3,000 writes": lambda b, r: lone(b, r),
    "4 processes x 1,000 writes, one hot row": lambda b, r: stress(b, 4, 1000, 0),
    "cold storm, 64 x 1": lambda b, r: stress(b, 64, 1, 0),
    "contention, 32 x 20 x 10 ms": lambda b, r: stress(b, 32, 20, 10),
}
try:
    for name, load in loads.items():
        runs = {b: [] for b in bins}
        for r in range(rounds):
            for b, path in bins.items():
                runs[b].append(load(path, r))
        print(f"## {name} ({rounds} rounds, medians)")
        med = {}
        for b, v in runs.items():
            m = {"rate": statistics.median(s["writes_per_second"] for s in v)}
            line = f"- {b}: {m['rate']:.0f} writes/s"
            if "failed_processes" in v[0]:
                m["ready"] = statistics.median(s["ready_ms"]["p50"] for s in v)
                m["p99"] = statistics.median(s["wait_ms"]["p99"] for s in v)
                m["max"] = statistics.median(s["wait_ms"]["max"] for s in v)
                fair = v[0]["fair_wait_ms"]
                line += (f", ready p50 {m['ready']:.0f} ms, wait p99 {m['p99']:.0f} ms, max {m['max']:.0f} ms"
                         + (f" ({m['max'] / fair:.2f} x fair)" if fair else "")
                         + f", failed {[s['failed_processes'] for s in v]}")
            med[b] = m
            print(line)
        print(f"- after/before: rate {med['after']['rate'] / med['before']['rate']:.3f}"
              + (f", ready p50 {med['after']['ready'] / med['before']['ready']:.3f}" if "ready" in med["after"] else ""))
        print()
finally:
    server.stop()
