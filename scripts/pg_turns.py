#!/usr/bin/env python3
"""Where a contended PostgreSQL write's wait goes: the contention load of `stress` (N processes x
K writes, each holding its transaction H ms on one hot row) run by hand, each process's
`record --json` lines read as they come, so that every write's commit time is known. Per build
and round: the commits in each 100 ms after the launch (a queue that runs at its pace commits
1000 / H per 100 ms / 10, about 9 for 10 ms), the maximum wait against the fair one (N x H),
and the longest waits with the commits that went by meanwhile (ms per turn). Builds alternate
in each round, on one throwaway server (initdb into a temporary directory, Unix socket only,
fsync=off; as the postgres user when run as root), a fresh database each run.
usage: scripts/pg_turns.py BINARY [BINARY...] [--rounds R] [--processes N] [--writes K] [--hold-ms H]"""
import argparse, collections, json, os, statistics, subprocess, threading, time

from pgserver import Server

ap = argparse.ArgumentParser()
ap.add_argument("binaries", nargs="+")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--processes", type=int, default=32)
ap.add_argument("--writes", type=int, default=20)
ap.add_argument("--hold-ms", type=int, default=10)
args = ap.parse_args()
server = Server("sp-pgturns-")


def run(binary):
    db = f"turns_{time.time_ns()}"
    server.psql(f"CREATE DATABASE {db}")
    url = server.url(db)
    start = time.time()
    procs = [subprocess.Popen([binary, "record", "--db", url, "--artifact", "stress", "--json", "--count",
                               str(args.writes), "--hold-ms", str(args.hold_ms)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(args.processes)]
    rows, lock = [], threading.Lock()

    def read(proc):
        for line in proc.stdout:
            at = time.time() - start
            v = json.loads(line)
            with lock:
                rows.append((at, v["wait_us"] / 1000, v["attempts"]))

    readers = [threading.Thread(target=read, args=(p,)) for p in procs]
    for r in readers:
        r.start()
    for r in readers:
        r.join(timeout=600)
    failed = sum(1 for p in procs if p.wait(timeout=60) != 0)
    server.psql(f"DROP DATABASE {db} WITH (FORCE)")
    return rows, failed


fair = args.processes * args.hold_ms
try:
    for r in range(args.rounds):
        for binary in args.binaries:
            rows, failed = run(binary)
            rows.sort()
            done = [t for t, _, _ in rows]
            waits = sorted(w for _, w, _ in rows)
            per = collections.Counter(int(t * 10) for t in done)
            first = int(done[0] * 10)
            print(f"## {binary}, round {r + 1}: {failed} failed, {len(rows)} acknowledged, "
                  f"wait p50 {statistics.median(waits):.0f} ms, max {waits[-1]:.0f} ms "
                  f"({waits[-1] / fair:.2f} x fair), retried writes {sum(1 for *_, a in rows if a > 1)}")
            print("- commits per 100 ms from the first:", " ".join(str(per[i]) for i in range(first, int(done[-1] * 10) + 1)))
            for at, wait, attempts in sorted(rows, key=lambda x: x[1])[-3:]:
                asked = at - wait / 1000
                turns = sum(1 for t in done if asked < t < at)
                print(f"- a wait of {wait:.0f} ms ({attempts} attempts), asked {asked - done[0]:+.2f} s after the "
                      f"first commit: {turns} commits meanwhile, {wait / max(turns, 1):.1f} ms each")
finally:
    server.stop()
