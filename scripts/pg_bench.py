#!/usr/bin/env python3
"""PostgreSQL: the cold storm and the contention workloads of BENCHMARKS.md, this crate against
plain Diesel on PostgreSQL (run_pending_migrations, default transactions), side by side in one
run of `stress --compare` each round, on fresh databases of a throwaway server this script
starts (initdb into a temporary directory, as the postgres user when run as root, Unix socket
only, fsync=off) and stops. PG_BENCH_URL=postgresql://... uses an existing server instead (the
role needs CREATEDB). It builds the command line with its `postgres` feature into
target/pg (the default build links no libpq).
usage: scripts/pg_bench.py [ROUNDS] (default 5)"""
import json, os, subprocess, sys, statistics

from pgserver import Server

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
subprocess.run(["cargo", "build", "--release", "--quiet", "--features", "postgres", "--target-dir",
                os.path.join(root, "target", "pg")], cwd=root, check=True)
binary = os.path.join(root, "target", "pg", "release", "sqlite-persistence")
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5


def start_server():
    if os.environ.get("PG_BENCH_URL"):
        return os.environ["PG_BENCH_URL"], None
    server = Server("sp-pgbench-")
    return server.url(), server


def stop_server(server):
    if server is not None:
        server.stop()


def stress(url, processes, writes, hold):
    """This crate, plain Diesel (one `stress --compare` run), then this crate without its
    write queue (`stress --no-fair-queue`), alternating in each round."""
    def run(extra):
        out = subprocess.run([binary, "stress", "--json", "--db", url, "--processes", str(processes),
                              "--writes", str(writes), "--hold-ms", str(hold)] + extra,
                             capture_output=True, text=True, timeout=900)
        return json.loads(out.stdout)["sides"]
    sides = run(["--compare"])
    queue_off = run(["--no-fair-queue"])[0]
    queue_off["label"] = "sqlite-persistence, no write queue"
    return sides + [queue_off]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


url, server = start_server()
try:
    for name, (n, k, h) in {"cold storm: 64 processes x 1 write": (64, 1, 0),
                            "contention: 32 processes x 20 writes x 10 ms": (32, 20, 10)}.items():
        runs = [stress(url, n, k, h) for _ in range(rounds)]
        print(f"## {name} ({rounds} rounds; medians, and the range of failures)")
        print("| side | failed processes | acknowledged writes | stored, distinct and gapless | "
              "ready p50 | wait p50 | wait p99 | wait max (x fair) | writes/s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for i in range(3):
            sides = [r[i] for r in runs]
            failed = [s["failed_processes"] for s in sides]
            fair = sides[0]["fair_wait_ms"]
            wmax = median([s["wait_ms"]["max"] for s in sides])
            ratio = f" ({wmax / fair:.2f} x)" if fair else ""
            print(f"| {sides[0]['label']} | {min(failed)}-{max(failed)} of {n} "
                  f"| {median([s['acknowledged_writes'] for s in sides]):.0f} of {n * k} "
                  f"| {sum(s['distinct_gapless'] and s['stored_versions'] == s['acknowledged_writes'] for s in sides)} of {rounds} rounds "
                  f"| {median([s['ready_ms']['p50'] for s in sides]):.0f} ms "
                  f"| {median([s['wait_ms']['p50'] for s in sides]):.0f} ms "
                  f"| {median([s['wait_ms']['p99'] for s in sides]):.0f} ms "
                  f"| {wmax:.0f} ms{ratio} "
                  f"| {median([s['writes_per_second'] for s in sides]):.0f} |")
        causes = {}
        for r in runs:
            for cause, count in r[1]["failures_by_cause"].items():
                causes[cause] = causes.get(cause, 0) + count
        for cause, count in sorted(causes.items(), key=lambda c: -c[1])[:4]:
            print(f"- plain: {count} x {cause[:160]}")
        print()
finally:
    stop_server(server)
