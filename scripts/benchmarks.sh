#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md, each side by side with its baseline in one run.
# Needs python3 for the contention, warm-start, pinned-WAL and backup scripts. Takes about
# 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
B=./target/release/sqlite-persistence
throughput() {
    "$B" stress --processes "$1" --writes "$2" --hold-ms 0 --json | python3 -c '
import json, sys
j = json.load(sys.stdin); s = j["sides"][0]
print("%(p)s x %(w)s: %(r).0f writes/s, clean %(c)s" % dict(p=j["load"]["processes"], w=j["load"]["writes"], r=s["writes_per_second"], c=s["clean"]))'
}
for i in 1 2; do echo "== cold storm, 64 processes ($i)"; "$B" stress --processes 64 --writes 1 --hold-ms 0 --compare || true; done
for i in 1 2; do echo "== cold storm, 256 processes ($i)"; "$B" stress --processes 256 --writes 1 --hold-ms 0 --compare || true; done
for i in 1 2 3; do echo "== contention, 32 x 20 x 10 ms ($i)"; "$B" stress --compare || true; done
for i in 1 2; do echo "== contention, fair queue on and off ($i)"; scripts/contention.py; done
for i in 1 2 3; do echo "== throughput ($i)"; throughput 8 2000; throughput 1 16000; done
echo "== warm start"; scripts/warm_start.py 40; scripts/warm_start.py 40
echo "== uncontended write"; cargo bench -q --bench uncontended 2>/dev/null | grep "uncontended write"
echo "== pinned WAL"; scripts/pinned_wal.py
echo "== backups during a soak"; scripts/backup_soak.py 10 1000 2
echo "== threads of one process"; cargo bench -q --bench threads 2>/dev/null | grep "threads x"
echo "== PostgreSQL: cold storm and contention"; scripts/pg_bench.py 5
echo "== pictures"; scripts/plots.py
