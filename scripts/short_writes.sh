#!/usr/bin/env bash
# Short writes: 16 processes x 500 sub-millisecond writes on a fresh file, this build with
# its write queue, a BEFORE build with its queue, and this build with the queue off
# (`--no-fair-queue`), alternating for ROUNDS rounds; one line per run: failed processes,
# writes/s, and the p50/p99/max wait in ms. Build first: cargo build --release.
# usage: scripts/short_writes.sh BEFORE_BINARY [ROUNDS] [PROCESSES] [WRITES]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
new="$root/target/release/sqlite-persistence"
old="$1"; rounds="${2:-3}"; n="${3:-16}"; k="${4:-500}"
for _ in $(seq "$rounds"); do
  for side in before after off; do
    dir=$(mktemp -d)
    bin="$new"; extra=()
    [ "$side" = before ] && bin="$old"
    [ "$side" = off ] && extra=(--no-fair-queue)
    "$bin" stress --db "$dir/c.db" --processes "$n" --writes "$k" --hold-ms 0 --json "${extra[@]}" |
      python3 -c "
import json, sys
s = json.load(sys.stdin)['sides'][0]; w = s['wait_ms']
print('$side'.ljust(7), 'failed', s['failed_processes'], 'writes/s %.0f' % s['writes_per_second'],
      'wait ms p50 %.3f p99 %.2f max %.1f' % (w['p50'], w['p99'], w['max']))"
    rm -rf "$dir"
  done
done
