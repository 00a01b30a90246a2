#!/usr/bin/env python3
"""A pinned WAL: N processes x K writes (`record`, started together) on a migrated file while
another process (Python's sqlite3) holds one read transaction from before the first write
until the last; against the same writes unpinned. Reports the throughput of both, when the
first warning naming the reader's pid came (seconds after the writes began) and how large the
WAL was then, and, after the reader ends (its connection still open), how long and how many
more writes (10 per `record` process) until the WAL is back under journal_size_limit.
Build first: cargo build --release.
usage: scripts/pinned_wal.py [N K] (default 8 2500)"""
import os, re, sqlite3, subprocess, sys, tempfile, threading, time
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = os.path.join(root, "target", "release", "sqlite-persistence")
n, k = (int(a) for a in (sys.argv[1:3] if len(sys.argv) >= 3 else (8, 2500)))
LIMIT = 64 * 1024 * 1024  # the default journal_size_limit


def wal_size(db):
    try:
        return os.path.getsize(db + "-wal")
    except FileNotFoundError:
        return 0


def run(pinned):
    d = tempfile.mkdtemp(); db = os.path.join(d, "p.db"); barrier = os.path.join(d, "go")
    subprocess.run([binary, "--db", db, "migrate"], check=True, capture_output=True)
    reader = None
    if pinned:
        reader = sqlite3.connect(db, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM sqlite_master").fetchall()
    cmd = [binary, "record", "--db", db, "--barrier", barrier, "--artifact", "a", "--count", str(k)]
    env = dict(os.environ, SQLITE_PERSISTENCE_LOG="warn")
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
             for _ in range(n)]
    t0 = time.time()
    while sum(1 for f in os.listdir(d) if ".ready-" in f) < n:
        if time.time() - t0 > 60: sys.exit("children not ready")
        time.sleep(0.005)
    first = {}
    def watch(p):
        for line in p.stderr:
            line = line.decode(errors="replace")
            if "the WAL keeps growing" in line and "first" not in first:
                first["first"] = (time.time(), wal_size(db), line.strip())
    watchers = [threading.Thread(target=watch, args=(p,)) for p in procs]
    for w in watchers: w.start()
    start = time.time(); open(barrier, "w").close()
    failed = sum(p.wait(timeout=600) != 0 for p in procs)
    took = time.time() - start
    for w in watchers: w.join()
    result = {"writes/s": n * k / took, "failed": failed, "wal_mib_at_end": wal_size(db) / 2**20}
    if pinned:
        if "first" in first:
            at, size, line = first["first"]
            named = re.search(r"process (\d+)", line)
            result["warned_after_s"] = at - start
            result["wal_mib_at_warning"] = size / 2**20
            result["names_reader"] = bool(named) and int(named.group(1)) == os.getpid()
            if not result["names_reader"]: print("warning:", line, "reader pid", os.getpid())
        # The reader's connection stays open (no transaction): the WAL must come back under
        # the limit while the database is in use, not by the last connection's close.
        reader.execute("COMMIT")
        ended, writes = time.time(), 0
        while wal_size(db) > LIMIT and time.time() - ended < 30:
            subprocess.run([binary, "--db", db, "record", "--artifact", "b", "--count", "10"],
                           check=True, capture_output=True)
            writes += 10
        result["back_under_limit_s"] = time.time() - ended
        result["writes_until_under_limit"] = writes
        result["wal_mib_then"] = wal_size(db) / 2**20
        reader.close()
    return result


plain, pinned = run(False), run(True)
print("unpinned:", {key: round(v, 3) if isinstance(v, float) else v for key, v in plain.items()})
print("pinned:  ", {key: round(v, 3) if isinstance(v, float) else v for key, v in pinned.items()})
print(f"throughput pinned / unpinned: {pinned['writes/s'] / plain['writes/s']:.2f}")
