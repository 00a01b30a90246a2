"""A throwaway PostgreSQL server for the benchmark scripts (pg_bench.py, pg_compare.py,
pg_turns.py): initdb into a temporary directory (as the postgres user when run as root),
Unix socket only, fsync off, 400 connections; stopped (-m immediate) and removed by stop()."""
import os, shutil, subprocess, tempfile


class Server:
    def __init__(self, prefix):
        self.bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True,
                                     text=True).stdout.strip()
        self.dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        os.chmod(self.dir, 0o755)
        self.as_owner = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        subprocess.run(self.as_owner + [f"{self.bindir}/initdb", "-D", f"{self.dir}/data", "-A", "trust",
                                        "-U", "postgres", "--no-sync"], check=True, capture_output=True)
        subprocess.run(self.as_owner + [f"{self.bindir}/pg_ctl", "-D", f"{self.dir}/data", "-w", "-l",
                                        f"{self.dir}/log", "-o",
                                        f"-k {self.dir} -c listen_addresses='' -c fsync=off "
                                        "-c max_connections=400", "start"],
                       check=True, capture_output=True)

    def url(self, db="postgres"):
        return f"postgresql:///{db}?host={self.dir}&user=postgres"

    def psql(self, sql):
        subprocess.run([f"{self.bindir}/psql", "-h", self.dir, "-U", "postgres", "-d", "postgres",
                        "-qc", sql], check=True)

    def stop(self):
        subprocess.run(self.as_owner + [f"{self.bindir}/pg_ctl", "-D", f"{self.dir}/data", "-m",
                                        "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
