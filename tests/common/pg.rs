//! A real PostgreSQL server for the tests: `PG_TEST_URL` if set, else a private throwaway
//! cluster this test binary starts once (`initdb` into a temporary directory, as the
//! `postgres` user when run as root, listening only on a Unix socket there, `fsync=off`) and
//! a watcher process stops and removes when the binary exits. Each test gets a database of
//! its own.
//!
//! Without a server (no `initdb` found) the PostgreSQL tests say that they skipped and why;
//! with `PG_TESTS_REQUIRED=1` (CI) they fail instead.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection, RunQueryDsl};

/// The environment variable naming an existing server (a URL to a database the tests may
/// create databases from, such as `postgres`).
pub const PG_TEST_URL: &str = "PG_TEST_URL";

/// Set to `1` where the PostgreSQL tests must run (CI): a missing server fails them.
pub const PG_TESTS_REQUIRED: &str = "PG_TESTS_REQUIRED";

/// The server: the URL of its maintenance database.
struct Server {
    base: String,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

/// A URL of a fresh, empty database on the test server, or `None` (after saying why) when
/// there is no server and none is required.
pub fn fresh_database() -> Option<String> {
    let server = match SERVER.get_or_init(start) {
        Ok(server) => server,
        Err(why) => {
            if std::env::var(PG_TESTS_REQUIRED).as_deref() == Ok("1") {
                panic!(
                    "PostgreSQL tests are required ({PG_TESTS_REQUIRED}=1) but cannot run: {why}"
                );
            }
            eprintln!("skipped: no PostgreSQL server for this test: {why}");
            return None;
        }
    };
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "t_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut conn = PgConnection::establish(&server.base)
        .unwrap_or_else(|e| panic!("cannot connect to the test server: {e}"));
    conn.batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    Some(with_database(&server.base, &name))
}

/// `url` with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (url, None),
    };
    let authority_start = head.find("://").map_or(0, |i| i + 3);
    let path_start = head[authority_start..]
        .find('/')
        .map_or(head.len(), |i| authority_start + i);
    let mut out = format!("{}/{name}", &head[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

fn start() -> Result<Server, String> {
    if let Ok(url) = std::env::var(PG_TEST_URL) {
        if !url.is_empty() {
            return Ok(Server { base: url });
        }
    }
    // No process of it crashes: acknowledged commits need not wait for the WAL's flush.
    let cluster = Cluster::start("-c max_connections=400 -c synchronous_commit=off")?;
    let base = cluster.url("postgres");
    // The shared server lives as long as the test binary; its watcher removes it.
    std::mem::forget(cluster);
    Ok(Server { base })
}

/// A private throwaway cluster of a test's own, to restart, stop, fill or fail over without
/// disturbing the other tests: `initdb` into a temporary directory (as the `postgres` user
/// when run as root), listening only on a Unix socket there, `fsync=off` (the machine does not
/// crash) but `synchronous_commit` on (its server processes may: a commit it acknowledged
/// survives an immediate shutdown). A watcher process
/// stops it and removes its directory once the test binary has exited; dropping it does so
/// at once.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    root: bool,
    options: String,
}

impl Cluster {
    /// A private cluster started with the server options `extra` (`-c name=value ...`), or
    /// `None` (after saying why) when the tests may skip and no server can be made.
    pub fn private(extra: &str) -> Option<Cluster> {
        match Cluster::start(extra) {
            Ok(cluster) => Some(cluster),
            Err(why) => {
                if std::env::var(PG_TESTS_REQUIRED).as_deref() == Ok("1") {
                    panic!("PostgreSQL tests are required ({PG_TESTS_REQUIRED}=1) but cannot run: {why}");
                }
                eprintln!("skipped: no PostgreSQL server for this test: {why}");
                None
            }
        }
    }

    /// Makes a cluster (`initdb`) and starts it with the server options `extra`.
    pub fn start(extra: &str) -> Result<Cluster, String> {
        let cluster = Cluster::init()?;
        cluster.set_options(extra);
        cluster.pg_ctl(&["-w", "-t", "60", "start"])?;
        Ok(cluster)
    }

    /// Makes a cluster (`initdb`), not started.
    pub fn init() -> Result<Cluster, String> {
        let cluster = Cluster::empty()?;
        run(cluster
            .as_owner("initdb")
            .arg("-D")
            .arg(cluster.data())
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]))?;
        Ok(cluster)
    }

    /// A streaming standby of `primary` (which must be running), started with the server
    /// options `extra`: `pg_basebackup -R -X stream` over `primary`'s socket, as the owner
    /// (`initdb -A trust` lets local replication connections in), so that it follows the
    /// primary's WAL from its own socket directory. With `synchronous_standby_names = '*'`
    /// on the primary, it is the synchronous standby: a commit the primary acknowledged is on
    /// it. Waits (at most a minute) until the primary names it streaming.
    pub fn standby_of(primary: &Cluster, extra: &str) -> Result<Cluster, String> {
        let standby = Cluster::empty()?;
        run(standby
            .as_owner("pg_basebackup")
            .arg("-h")
            .arg(primary.socket_dir())
            .args(["-U", "postgres", "-X", "stream", "-R", "--no-sync", "-D"])
            .arg(standby.data()))?;
        standby.set_options(extra);
        standby.pg_ctl(&["-w", "-t", "60", "start"])?;
        let streaming = wait_until(Duration::from_secs(60), || {
            primary.replication_state().as_deref() == Some("streaming")
        });
        if !streaming {
            return Err(format!(
                "the standby is not streaming after 60 s: {}",
                standby.log()
            ));
        }
        Ok(standby)
    }

    /// The state of the primary's first WAL sender (`streaming` once a standby follows it),
    /// or `None` without one.
    pub fn replication_state(&self) -> Option<String> {
        #[derive(diesel::QueryableByName)]
        struct Sender {
            #[diesel(sql_type = diesel::sql_types::Text)]
            state: String,
        }
        diesel::sql_query("SELECT state FROM pg_stat_replication LIMIT 1")
            .get_result::<Sender>(&mut PgConnection::establish(&self.url("postgres")).ok()?)
            .ok()
            .map(|sender| sender.state)
    }

    /// `pg_ctl promote`: a standby becomes a primary on a new timeline; waits (at most a
    /// minute) until it accepts writes.
    pub fn promote(&self) {
        self.pg_ctl(&["-w", "-t", "60", "promote"])
            .unwrap_or_else(|e| panic!("cannot promote the standby: {e}"));
    }

    /// A directory for a cluster, owned by its owner, watched; nothing in it yet.
    fn empty() -> Result<Cluster, String> {
        let bin = bindir().ok_or(
            "no initdb: install PostgreSQL's server (Debian: postgresql), or set PG_TEST_URL",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("sp-pg-")
            .tempdir_in("/tmp")
            .map_err(|e| format!("cannot make a directory for the cluster: {e}"))?
            .keep();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| e.to_string())?;
        }
        if root {
            let status = Command::new("chown")
                .args(["postgres:"])
                .arg(&dir)
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !status.success() {
                return Err(
                    "there is no postgres user to run the cluster as (running as root)".into(),
                );
            }
        }
        let cluster = Cluster {
            dir,
            bin,
            root,
            options: String::new(),
        };
        watch(&cluster.dir, &cluster.bin, root);
        Ok(cluster)
    }

    /// Sets the server options the next `start` uses, after the harness's own.
    fn set_options(&self, extra: &str) {
        // Kept in a file: `pg_ctl restart` reuses the last start's options by itself.
        let options = format!(
            "-k {} -c listen_addresses='' -c fsync=off -c full_page_writes=off {extra}",
            self.dir.display()
        );
        std::fs::write(self.dir.join("options"), options).unwrap();
    }

    fn options(&self) -> String {
        std::fs::read_to_string(self.dir.join("options")).unwrap_or_default()
    }

    /// A program of the server's, run as the cluster's owner.
    pub fn as_owner(&self, program: &str) -> Command {
        if self.root {
            let mut command = Command::new("runuser");
            command
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join(program));
            command
        } else {
            Command::new(self.bin.join(program))
        }
    }

    /// `pg_ctl` with `args` on this cluster (its log and options added).
    pub fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        run(self
            .as_owner("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-o", &self.options()])
            .args(args))
    }

    /// `pg_ctl restart -m mode`, waiting (at most a minute) until it accepts connections.
    pub fn restart(&self, mode: &str) {
        self.pg_ctl(&["-w", "-t", "60", "-m", mode, "restart"])
            .unwrap_or_else(|e| panic!("cannot restart the cluster: {e}"));
    }

    /// `pg_ctl stop -m mode`.
    pub fn stop(&self, mode: &str) {
        self.pg_ctl(&["-w", "-t", "60", "-m", mode, "stop"])
            .unwrap_or_else(|e| panic!("cannot stop the cluster: {e}"));
    }

    /// Starts it again, with the server options `extra`; `wait` for it to accept connections.
    pub fn start_again(&self, extra: &str, wait: bool) {
        self.set_options(extra);
        let wait = if wait { "-w" } else { "-W" };
        self.pg_ctl(&[wait, "-t", "60", "start"])
            .unwrap_or_else(|e| panic!("cannot start the cluster: {e}"));
    }

    /// The data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The directory of its Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The URL of database `name` as the superuser `postgres`.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgresql:///{name}?host={}&user=postgres",
            self.dir.display()
        )
    }

    /// A fresh database on it, as the superuser: its URL.
    pub fn fresh_database(&self) -> String {
        let name = self.fresh_database_name();
        self.url(&name)
    }

    /// A fresh database on it, as the superuser: its name.
    pub fn fresh_database_name(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "p_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        connect(&self.url("postgres"))
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        name
    }

    /// The libpq multi-host URL of database `name` on `clusters`, as the superuser: libpq
    /// tries each socket directory in turn (all on the default port; their directories
    /// differ) and keeps the first session that accepts writes
    /// (`target_session_attrs=read-write`).
    pub fn failover_url(clusters: &[&Cluster], name: &str) -> String {
        let hosts: Vec<String> = clusters
            .iter()
            .map(|c| c.dir.display().to_string())
            .collect();
        format!(
            "postgresql:///{name}?host={}&user=postgres&target_session_attrs=read-write",
            hosts.join(",")
        )
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-w", "-t", "60", "-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server's programs: `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
fn bindir() -> Option<PathBuf> {
    let from_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    let mut candidates: Vec<PathBuf> = from_config.into_iter().collect();
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .collect();
    versions.sort();
    candidates.extend(versions.into_iter().rev());
    candidates
        .into_iter()
        .find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists())
}

fn run(command: &mut Command) -> Result<(), String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{command:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Starts a detached watcher that stops the cluster and removes its directory once this
/// process has exited.
fn watch(dir: &Path, bin: &Path, root: bool) {
    let runuser = if root { "runuser -u postgres -- " } else { "" };
    after_exit(
        &format!(
            "{runuser}'{bin}/pg_ctl' -D '{dir}/data' -m immediate stop >/dev/null 2>&1; \
             rm -rf '{dir}'",
            bin = bin.display(),
            dir = dir.display(),
        ),
        "the cluster's watcher",
    );
}

/// Starts a detached watcher (`what`, for the panic) that runs the shell commands `cleanup`
/// once this process has exited.
pub fn after_exit(cleanup: &str, what: &str) {
    use std::os::unix::process::CommandExt;
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; {cleanup}",
        pid = std::process::id(),
    );
    // `sh` starts the watcher in the background and exits: the watcher is not this
    // process's child, and outlives it.
    let mut command = Command::new("sh");
    command
        .args(["-c", &format!("( {script} ) &")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Its own session: a Ctrl-C of the test run must not stop it before it cleans up.
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    assert!(status.success(), "cannot start {what}: {status}");
}

/// A plain session on `url`, for setting up and checking.
pub fn connect(url: &str) -> PgConnection {
    PgConnection::establish(url).unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// Waits (at most `limit`) until `check` is true, polling every 20 ms.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Runs `f` on a thread and waits for it at most `limit`: a hang fails the test instead of
/// stopping the suite.
pub fn within<T: Send + 'static>(
    limit: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    result
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("still running after {limit:?}"))
}
