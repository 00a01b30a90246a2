#!/usr/bin/env python3
"""Opens and writes under a storm of ended sessions: 6 threads each run the command line's
`record --count 20` (an open, then 20 writes) in a loop for SECONDS, while one session ends
every other session of the database every 50 ms (`pg_terminate_backend`). Prints the runs
that succeeded and the failed ones by error. One throwaway server (scripts/pgserver.py).
usage: scripts/pg_kill_storm.py BINARY SECONDS"""
import collections, os, re, subprocess, sys, threading, time

from pgserver import Server
s = Server("sp-kill-")
try:
    s.psql("CREATE DATABASE k")
    b = sys.argv[1]
    url = s.url("k")
    subprocess.run([b, "record", "--db", url, "--artifact", "init"], check=True, capture_output=True)
    stop = time.time() + float(sys.argv[2])
    killer = subprocess.Popen([f"{s.bindir}/psql", "-h", s.dir, "-U", "postgres", "-d", "postgres", "-Atq", "-c",
        f"set statement_timeout='{sys.argv[2]}s'", "-c",
        "DO $$ begin loop perform pg_stat_clear_snapshot(); perform pg_terminate_backend(pid) from pg_stat_activity where datname='k' and pid<>pg_backend_pid() and backend_type='client backend'; perform pg_sleep(0.05); end loop; end $$"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    errs = collections.Counter(); ok = 0
    def worker(w):
        global ok
        while time.time() < stop:
            r = subprocess.run([b, "record", "--db", url, "--artifact", f"w{w}", "--count", "20"], capture_output=True, text=True, timeout=120)
            if r.returncode == 0: ok += 1
            else:
                e = [l for l in r.stderr.splitlines() if l.startswith("error")]
                errs[re.sub(r"\d{3,}", "N", e[0][:150] if e else r.stderr[-150:])] += 1
    ts = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in ts: t.start()
    for t in ts: t.join()
    killer.wait()
    print("ok runs", ok)
    for e, n in errs.most_common(): print(n, e)
finally:
    s.stop()
