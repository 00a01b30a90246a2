#!/usr/bin/env python3
"""Where a hand-over of the SQLite write turn between processes goes, from the trace that
scripts/handover_trace.patch adds (a measuring build only, never to be merged: it applies
to 234f6e2, `git apply --check` says whether it still applies). Each process appends
"TAG NANOSECONDS" lines (one clock for the machine) to SPX_TRACE/<pid>: R the turn given back and a waiter named,
T the named waiter took it (t: one not named), b/B before/after BEGIN IMMEDIATE, c/C
before/after COMMIT, E the turn's end. The patch also reads SPX_STARVING_US,
SPX_MIN_STREAK_US and SPX_MAX_STREAK_US (the board's bound and the streak lengths) and
SPX_MMAP (mmap_size). Prints: the gap from R to T (the wake-up), the first write after a
hand-over against a write inside a streak, phase by phase (medians, microseconds).

    git worktree add --detach /tmp/trace HEAD && cd /tmp/trace
    git apply scripts/handover_trace.patch && cargo build --release -p sqlite-persistence-cli
    mkdir /tmp/tr && SPX_TRACE=/tmp/tr SPX_STARVING_US=4000 SPX_MIN_STREAK_US=100 \\
        target/release/sqlite-persistence stress --db /tmp/tr.db --processes 16 --writes 500 \\
        --hold-ms 0 --json > /dev/null
    python3 scripts/handover_trace.py /tmp/tr

usage: scripts/handover_trace.py TRACE_DIR"""
import collections, os, sys

events = []
for name in os.listdir(sys.argv[1]):
    with open(os.path.join(sys.argv[1], name)) as f:
        for line in f:
            tag, ns = line.split()
            events.append((int(ns), tag, name))
events.sort()


def median(values):
    values = sorted(values)
    return values[len(values) // 2] / 1000 if values else float("nan")


gaps, last_release = [], None
for ns, tag, _ in events:
    if tag == "R":
        last_release = ns
    elif tag == "T" and last_release is not None:
        gaps.append(ns - last_release)
print(f"hand-overs {len(gaps)}: named -> taken, median {median(gaps):.1f} us")

phases = {"after a hand-over": collections.defaultdict(list), "inside a streak": collections.defaultdict(list)}
by_process = collections.defaultdict(list)
for ns, tag, process in events:
    by_process[process].append((ns, tag))
for seq in by_process.values():
    mode, last = "inside a streak", None
    for ns, tag in seq:
        if tag in "Tt":
            mode = "after a hand-over"
        if last is not None and tag in "bBcCE" and last[1] in "TtbBcE":
            phases[mode][f"{last[1]}->{tag}"].append(ns - last[0])
        last = (ns, tag)
        if tag == "E":
            mode = "inside a streak"
names = {"b->B": "BEGIN IMMEDIATE", "B->c": "the closure", "c->C": "COMMIT"}
for mode, spans in phases.items():
    print(f"{mode}: " + ", ".join(f"{names[k]} {median(spans[k]):.1f} us" for k in names)
          + f" ({len(spans['B->c'])} writes)")
