#!/usr/bin/env bash
# Start PROCS real processes of `record --artifact a` together on a fresh file, ROUNDS times;
# build first with `cargo build --release`. Needs python3 (its sqlite3 module) for the check.
# usage: scripts/storm.sh ROUNDS PROCS [extra record args...]; prints failures per round and checks versions.
bin="$(cd "$(dirname "$0")/.." && pwd)/target/release/sqlite-persistence"
rounds=$1; n=$2; shift 2
total_fail=0
for r in $(seq 1 $rounds); do
  d=$(mktemp -d); b=$d/go
  for i in $(seq 1 $n); do $bin record --db $d/c.db --barrier $b --artifact a "$@" >$d/out.$i 2>$d/err.$i & done
  for t in $(seq 1 6000); do [ $(ls $d | grep -c ready) -ge $n ] && break; sleep 0.01; done
  touch $b; wait
  fail=$(cat $d/err.* | grep -c '^error:')
  total_fail=$((total_fail+fail))
  vers=$(python3 -c "import sqlite3;c=sqlite3.connect('$d/c.db');print(c.execute('select count(*), count(distinct version), min(version), max(version) from artifact_versions').fetchone(), c.execute('select count(*) from __diesel_schema_migrations').fetchone()[0])" 2>&1)
  echo "round $r: failures $fail; versions(count,distinct,min,max) migrations: $vers"
  cat $d/err.* | grep '^error:' | sort | uniq -c | sort -rn | head -3
  rm -rf $d
done
echo "TOTAL failures: $total_fail of $((rounds*n))"
