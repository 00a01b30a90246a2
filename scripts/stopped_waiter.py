#!/usr/bin/env python3
"""A waiter stopped (SIGSTOP) for 0.5 s while 16 processes write back to back on one file:
how long it waits once it resumes (its longest wait among its first 3 writes after the
SIGCONT, which includes the 0.5 s if it was stopped while waiting), and the others' p99 and
maximum waits. Builds alternate in each round; temporary files under /tmp/stopexp.
usage: scripts/stopped_waiter.py BINARY[,BINARY...] [ROUNDS]"""
import json, os, shutil, signal, subprocess, sys, tempfile, threading, time
def run(binary, n=16, count=4000, stop=0.5):
    os.makedirs("/tmp/stopexp", exist_ok=True)
    d = tempfile.mkdtemp(dir="/tmp/stopexp")
    db = f"{d}/s.db"
    subprocess.run([binary, "record", "--db", db, "--artifact", "w", "--count", "1"], check=True, capture_output=True)
    procs = [subprocess.Popen([binary, "record", "--db", db, "--artifact", f"a{i}", "--count", str(count), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for i in range(n)]
    lines = {i: [] for i in range(n)}
    def read(i):
        for l in procs[i].stdout:
            lines[i].append((time.time(), json.loads(l)["wait_us"] / 1000))
    ts = [threading.Thread(target=read, args=(i,)) for i in range(n)]
    for t in ts: t.start()
    time.sleep(1.0)
    victim = 0
    os.kill(procs[victim].pid, signal.SIGSTOP); stopped = time.time()
    time.sleep(stop)
    os.kill(procs[victim].pid, signal.SIGCONT); resumed = time.time()
    for t in ts: t.join(timeout=300)
    for p in procs: p.wait(timeout=60)
    shutil.rmtree(d, ignore_errors=True)
    # The victim's writes acknowledged after the resume: the longest wait of its first 3.
    after = [w for at, w in lines[victim] if at > resumed][:3]
    others = sorted(w for i in range(1, n) for _, w in lines[i])
    return max(after) if after else None, others[int(len(others) * 0.99)], others[-1]
for r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
    for b in sys.argv[1].split(","):
        res = run(b)
        print(f"{os.path.basename(b)}: victim's longest of first 3 waits after resume {res[0]:.1f} ms (includes the time stopped if it was waiting); others p99 {res[1]:.1f} max {res[2]:.1f}", flush=True)
