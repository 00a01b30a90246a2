#!/usr/bin/env python3
"""Backups during a soak: `soak --seconds S` (8 processes mixing reads and writes) without
and with `--backup-every-ms B` (this process backs the database up that often and checks
each backup holds every write acknowledged before it began), alternately R times; reports
each run's write latency p50/p99 and the backups, then the median p99 ratio.
Build first: cargo build --release.
usage: scripts/backup_soak.py [S B R] (default 10 1000 3)"""
import json, os, statistics, subprocess, sys, tempfile
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = os.path.join(root, "target", "release", "sqlite-persistence")
s, b, r = (int(a) for a in (sys.argv[1:4] if len(sys.argv) >= 4 else (10, 1000, 3)))


def soak(extra):
    d = tempfile.mkdtemp()
    out = subprocess.run([binary, "--db", os.path.join(d, "s.db"), "soak", "--seconds", str(s),
                          "--json"] + extra, capture_output=True, text=True, timeout=s + 300)
    side = json.loads(out.stdout)["sides"][0]
    return side


p99 = {"without": [], "with": []}
for i in range(r):
    for label, extra in (("without", []), ("with", ["--backup-every-ms", str(b)])):
        side = soak(extra)
        p99[label].append(side["write_p99_us"])
        bk = side["backups"]
        print(f"run {i + 1} {label:7} backups: clean {side['clean']}, writes {side['acknowledged_writes']}, "
              f"p50 {side['write_p50_us'] / 1000:.2f} ms, p99 {side['write_p99_us'] / 1000:.2f} ms"
              + (f"; backups {bk['taken']} taken, {bk['failed']} failed, {bk['missing_writes']} writes "
                 f"missing, {bk['not_ok']} not ok, longest {bk['longest_ms']} ms" if extra else ""))
m_without, m_with = statistics.median(p99["without"]), statistics.median(p99["with"])
print(f"median p99: {m_without / 1000:.2f} ms without, {m_with / 1000:.2f} ms with backups: "
      f"{m_with / m_without:.3f} x")
