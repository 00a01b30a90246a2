#!/usr/bin/env python3
"""PostgreSQL faults under load: writers of the command line (`record`, one SERIALIZABLE write
transaction per version of one hot artifact) while the server restarts (`pg_ctl restart -m fast`,
`-m immediate`), has its sessions ended (a `pg_terminate_backend` sweep), or fails over (the
primary stopped with `-m immediate` and its synchronous streaming standby promoted, the writers
naming both in one libpq multi-host URL with `target_session_attrs=read-write`). Each round
runs on a fresh database (a fresh primary and standby for a failover), on throwaway servers
this script starts (initdb into temporary directories, as the postgres user when run as root,
Unix sockets only, fsync=off, synchronous_commit on) and removes. It builds the command line
with its `postgres` feature into target/pg, as scripts/pg_bench.py does.

It prints a markdown table: per scenario the rounds, the failed processes (range over the
rounds; goal 0), the acknowledged writes, the acknowledged writes not stored (lost; goal 0),
the versions stored more than acknowledged beyond the unknown outcomes (doubled; goal 0), and
the processes that failed with Error::CommitOutcomeUnknown (a COMMIT in flight whose outcome
the server cannot prove after a crash or a failover: reported, never run again), and how many of
those writes are stored (they committed after all).

usage: scripts/pg_faults.py [ROUNDS [SCENARIO...]] (default 5 rounds of each of fast, immediate,
sweep and failover)
SP_BIN=path uses that build of the command line instead of building one; SP_FAULTS_LOGS=file
appends the writers' logs (stderr) to that file (SQLITE_PERSISTENCE_LOG sets what they log)."""
import json, os, shutil, subprocess, sys, tempfile, time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = os.environ.get("SP_BIN")
if not binary:
    subprocess.run(["cargo", "build", "--release", "--quiet", "--features", "postgres", "--target-dir",
                    os.path.join(root, "target", "pg")], cwd=root, check=True)
    binary = os.path.join(root, "target", "pg", "release", "sqlite-persistence")
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                        check=True).stdout.strip()
as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
UNKNOWN = "whether it committed is unknown"
WRITES = 600


class Cluster:
    """A throwaway cluster in a temporary directory, its socket there."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="sp-pgfaults-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        if as_owner:
            shutil.chown(self.dir, "postgres")
        self.data = f"{self.dir}/data"
        self.options = ""

    def run(self, program, *args):
        subprocess.run(as_owner + [f"{bindir}/{program}", *args], check=True, capture_output=True,
                       timeout=120)

    def initdb(self):
        self.run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync", "-E",
                 "UTF8", "--locale=C")

    def basebackup(self, primary):
        self.run("pg_basebackup", "-h", primary.dir, "-U", "postgres", "-X", "stream", "-R",
                 "--no-sync", "-D", self.data)

    def pg_ctl(self, *args):
        self.run("pg_ctl", "-D", self.data, "-l", f"{self.dir}/log", "-w", "-t", "60", *args)

    def start(self, extra):
        self.options = (f"-k {self.dir} -c listen_addresses='' -c fsync=off "
                        f"-c full_page_writes=off -c max_connections=100 {extra}")
        self.pg_ctl("-o", self.options, "start")

    def url(self, db):
        return f"postgresql:///{db}?host={self.dir}&user=postgres"

    def remove(self):
        subprocess.run(as_owner + [f"{bindir}/pg_ctl", "-D", self.data, "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def psql(url, sql):
    out = subprocess.run(["psql", "-X", "-At", "-d", url, "-c", sql], capture_output=True,
                         text=True, timeout=60)
    return out.stdout if out.returncode == 0 else None


def stored(url):
    out = psql(url, "SELECT v.version FROM artifact_versions v JOIN artifacts a "
                    "ON a.id = v.artifact_id WHERE a.name = 'hot' ORDER BY v.version")
    return [int(line) for line in out.split()] if out else []


def load(url, processes, disturb):
    """`processes` writers of WRITES versions each on `url`; `disturb()` once a tenth are
    stored. What they acknowledged, how they failed, and what is stored."""
    children = [subprocess.Popen([binary, "record", "--db", url, "--artifact", "hot", "--count",
                                  str(WRITES), "--json"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
                for _ in range(processes)]
    try:
        deadline = time.monotonic() + 120
        while (len(stored(url)) < processes * WRITES // 10
               and any(c.poll() is None for c in children)):
            if time.monotonic() > deadline:
                raise SystemExit("the writers stored nothing in 120 s")
            time.sleep(0.02)
        disturb()
        results = [c.communicate(timeout=600) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
    if os.environ.get("SP_FAULTS_LOGS"):
        with open(os.environ["SP_FAULTS_LOGS"], "a") as logs:
            logs.writelines(err for _, err in results)
    failed = [(c.returncode, err) for c, (_, err) in zip(children, results) if c.returncode != 0]
    acknowledged = [json.loads(line)["version"] for out, _ in results for line in out.splitlines()]
    unknown = sum(UNKNOWN in err for _, err in failed)
    versions = stored(url)
    distinct = set(acknowledged)
    lost = len(distinct - set(versions))
    extra = len(set(versions) - distinct)
    doubled = (len(acknowledged) - len(distinct)) + max(0, extra - unknown) \
        + (len(versions) - len(set(versions)))
    causes = [next((line for line in err.splitlines() if line.startswith("error:")),
                   f"exit status {code}")[:200] for code, err in failed if UNKNOWN not in err]
    return dict(failed=len(failed), acknowledged=len(acknowledged), lost=lost, doubled=doubled,
                unknown=unknown, unknown_stored=min(extra, unknown), causes=causes)


def restart_rounds(name, disturb):
    cluster = Cluster()
    try:
        cluster.initdb()
        cluster.start("")
        runs = []
        for i in range(rounds):
            db = f"faults_{i}"
            psql(cluster.url("postgres"), f"CREATE DATABASE {db}")
            runs.append(load(cluster.url(db), 4, lambda: disturb(cluster)))
        return name, 4, runs
    finally:
        cluster.remove()


def failover_round():
    primary, standby = Cluster(), Cluster()
    try:
        primary.initdb()
        primary.start("-c wal_level=replica -c max_wal_senders=4 -c synchronous_standby_names='*'")
        standby.basebackup(primary)
        standby.start("")
        deadline = time.monotonic() + 60
        while psql(primary.url("postgres"), "SELECT state FROM pg_stat_replication") != "streaming\n":
            if time.monotonic() > deadline:
                raise SystemExit("the standby is not streaming after 60 s")
            time.sleep(0.05)
        psql(primary.url("postgres"), "CREATE DATABASE faults")
        url = (f"postgresql:///faults?host={primary.dir},{standby.dir}&user=postgres"
               "&target_session_attrs=read-write")

        def fail_over():
            primary.pg_ctl("-m", "immediate", "stop")
            standby.pg_ctl("promote")
        return load(url, 8, fail_over)
    finally:
        primary.remove()
        standby.remove()


def sweep(cluster):
    psql(cluster.url("postgres"), "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")


chosen = set(sys.argv[2:]) or {"fast", "immediate", "sweep", "failover"}
scenarios = []
if "fast" in chosen:
    scenarios.append(restart_rounds("restart -m fast",
                                    lambda c: c.pg_ctl("-o", c.options, "-m", "fast", "restart")))
if "immediate" in chosen:
    scenarios.append(restart_rounds("restart -m immediate",
                                    lambda c: c.pg_ctl("-o", c.options, "-m", "immediate",
                                                       "restart")))
if "sweep" in chosen:
    scenarios.append(restart_rounds("pg_terminate_backend sweep", sweep))
if "failover" in chosen:
    scenarios.append(("failover to a synchronous standby (-m immediate, promote)", 8,
                      [failover_round() for _ in range(rounds)]))
print(f"## PostgreSQL faults under load ({WRITES} writes per process, one hot artifact)")
print("| scenario | rounds | failed processes | acknowledged | lost | doubled | "
      "CommitOutcomeUnknown |")
print("|---|---|---|---|---|---|---|")
for name, processes, runs in scenarios:
    failed = [r["failed"] for r in runs]
    print(f"| {name}, {processes} processes | {len(runs)} | {min(failed)}-{max(failed)} of {processes} "
          f"| {sum(r['acknowledged'] for r in runs)} of {processes * WRITES * len(runs)} "
          f"| {sum(r['lost'] for r in runs)} | {sum(r['doubled'] for r in runs)} "
          f"| {sum(r['unknown'] for r in runs)} ({sum(r['unknown_stored'] for r in runs)} stored) |")
causes = [c for _, _, runs in scenarios for r in runs for c in r["causes"]]
for cause in causes[:8]:
    print(f"- failed: {cause}")
