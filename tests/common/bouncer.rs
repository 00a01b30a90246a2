//! A real PgBouncer in transaction pooling mode in front of the test server (see `pg`): the
//! shape of hosted PostgreSQL that session state does not survive (and one in session
//! pooling mode, which keeps a client on one server connection). Started once per test
//! binary and per kind (Debian's `pgbouncer`, as the `postgres` user when run as root, since
//! it refuses root), listening only on a Unix socket in a private directory, with every
//! database of the test server behind it; a watcher process stops it and removes its
//! directory when the binary exits.
//!
//! Without `pgbouncer` the tests say that they skipped and why; with `PG_TESTS_REQUIRED=1`
//! (CI) they fail instead.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::Integer;

use super::pg;

/// The port in the Unix socket's name (`.s.PGSQL.6432`); the directory is private, so no
/// other program can collide with it.
const PORT: u16 = 6432;

/// A bouncer's pooling mode, and how it hands out the server connections it keeps idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Transaction pooling, PgBouncer's default order: the one used last first (a lone
    /// client tends to keep its server connection).
    LastUsed,
    /// Transaction pooling, `server_round_robin = 1`: in turn, so that a client's
    /// consecutive transactions land on different server connections whenever more than
    /// one is idle.
    RoundRobin,
    /// Session pooling: a client keeps its server connection until it disconnects.
    Session,
    /// Session pooling with one server connection per database and user: a second client
    /// waits for the first to disconnect.
    SessionOfOne,
    /// Statement pooling: a client that begins a transaction is closed.
    Statement,
}

static LAST_USED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
static ROUND_ROBIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
static SESSION: OnceLock<Result<PathBuf, String>> = OnceLock::new();
static SESSION_OF_ONE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
static STATEMENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// `url` (a database of the test server, from [`pg::fresh_database`]) reached through a
/// PgBouncer of kind `order`, or `None` (after
/// saying why) when there is no `pgbouncer` and none is required.
pub fn through_bouncer(url: &str, order: Order) -> Option<String> {
    let cell = match order {
        Order::LastUsed => &LAST_USED,
        Order::RoundRobin => &ROUND_ROBIN,
        Order::Session => &SESSION,
        Order::SessionOfOne => &SESSION_OF_ONE,
        Order::Statement => &STATEMENT,
    };
    let dir = match cell.get_or_init(|| start(url, order)) {
        Ok(dir) => dir,
        Err(why) => {
            if std::env::var(pg::PG_TESTS_REQUIRED).as_deref() == Ok("1") {
                panic!(
                    "PgBouncer tests are required ({}=1) but cannot run: {why}",
                    pg::PG_TESTS_REQUIRED
                );
            }
            eprintln!("skipped: no PgBouncer for this test: {why}");
            return None;
        }
    };
    let database = database(url);
    Some(format!(
        "postgresql:///{database}?host={}&port={PORT}&user=postgres",
        dir.display()
    ))
}

/// A fresh database of the test server and the same through the bouncer, or `None` when
/// either is missing (and not required).
pub fn fresh_database(order: Order) -> Option<(String, String)> {
    let direct = pg::fresh_database()?;
    let bounced = through_bouncer(&direct, order)?;
    Some((direct, bounced))
}

/// The database a URL of the form `postgresql:///name?...` names.
fn database(url: &str) -> &str {
    let head = url.split('?').next().unwrap();
    head.rsplit('/').next().unwrap()
}

/// A query parameter of `url`.
fn parameter<'a>(url: &'a str, name: &str) -> Option<&'a str> {
    url.split_once('?')?
        .1
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// The server's host (or socket directory) and port in `url`: its `host=` and `port=`
/// parameters, else its authority (`postgresql://user@host:port/db`, as `PG_TEST_URL` may
/// be).
fn server_address(url: &str) -> Option<(&str, &str)> {
    let after_scheme = url.split_once("://")?.1;
    let authority = after_scheme.split(['/', '?']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let (host, port) = host_port.split_once(':').unwrap_or((host_port, "5432"));
    let host = parameter(url, "host").unwrap_or(host);
    let port = parameter(url, "port").unwrap_or(port);
    (!host.is_empty()).then_some((host, port))
}

/// The installed `pgbouncer`.
fn program() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("pgbouncer"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let debian = PathBuf::from("/usr/sbin/pgbouncer");
        debian.is_file().then_some(debian)
    })
}

fn start(url: &str, order: Order) -> Result<PathBuf, String> {
    let program = program().ok_or("no pgbouncer: install it (Debian: pgbouncer, in /usr/sbin)")?;
    let (server, server_port) = server_address(url).ok_or_else(|| {
        format!("the test server's URL names no host for PgBouncer to connect to: {url}")
    })?;
    let dir = tempfile::Builder::new()
        .prefix("sp-bouncer-")
        .tempdir_in("/tmp")
        .map_err(|e| format!("cannot make a directory for PgBouncer: {e}"))?
        .keep();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let config = dir.join("pgbouncer.ini");
    let round_robin = u8::from(order == Order::RoundRobin);
    let pool_size = if order == Order::SessionOfOne { 1 } else { 40 };
    let mode = match order {
        Order::Session | Order::SessionOfOne => "session",
        Order::Statement => "statement",
        Order::LastUsed | Order::RoundRobin => "transaction",
    };
    std::fs::write(
        &config,
        format!(
            "[databases]\n\
             * = host={server} port={server_port}\n\
             [pgbouncer]\n\
             listen_port = {PORT}\n\
             unix_socket_dir = {dir}\n\
             auth_type = trust\n\
             auth_file = {dir}/users.txt\n\
             pool_mode = {mode}\n\
             server_round_robin = {round_robin}\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 1000\n\
             logfile = {dir}/log\n\
             pidfile = {dir}/pid\n",
            dir = dir.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").map_err(|e| e.to_string())?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
    }
    let mut command = if root {
        let status = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(&dir)
            .status()
            .map_err(|e| format!("chown: {e}"))?;
        if !status.success() {
            return Err("there is no postgres user to run PgBouncer as (running as root)".into());
        }
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(&program);
        command
    } else {
        Command::new(&program)
    };
    // -d: it detaches, and writes its pid file once it listens.
    let out = command
        .arg("-d")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{command:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{command:?} failed: {}{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        ));
    }
    watch(&dir);
    // Ready once a session through it works: its socket appears before it listens.
    let through = format!(
        "postgresql:///{}?host={}&port={PORT}&user=postgres",
        database(url),
        dir.display()
    );
    let mut last = String::new();
    let ready = pg::wait_until(Duration::from_secs(30), || {
        match PgConnection::establish(&through).and_then(|mut conn| {
            conn.batch_execute("SELECT 1")
                .map_err(diesel::ConnectionError::CouldntSetupConfiguration)
        }) {
            Ok(()) => true,
            Err(error) => {
                last = error.to_string();
                false
            }
        }
    });
    if !ready {
        return Err(format!(
            "PgBouncer did not let a session in within 30 s ({last}): {}",
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        ));
    }
    Ok(dir)
}

/// Starts a detached watcher that stops PgBouncer and removes its directory once this
/// process has exited.
fn watch(dir: &Path) {
    super::pg::after_exit(
        &format!(
            "kill \"$(cat '{dir}/pid')\" 2>/dev/null; sleep 0.5; rm -rf '{dir}'",
            dir = dir.display()
        ),
        "PgBouncer's watcher",
    );
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

/// The server process behind `conn`'s current statement.
pub fn backend_pid(conn: &mut PgConnection) -> i32 {
    diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(conn)
        .unwrap()
        .pid
}

/// Makes the bouncer keep at least `n` idle server connections to `bounced`'s database:
/// `n` clients each hold a transaction at once (so each has a server of its own), then end
/// them. Returns their server processes.
pub fn warm(bounced: &str, n: usize) -> Vec<i32> {
    let mut clients: Vec<PgConnection> = (0..n).map(|_| pg::connect(bounced)).collect();
    let mut pids: Vec<i32> = clients
        .iter_mut()
        .map(|conn| {
            conn.batch_execute("BEGIN").unwrap();
            backend_pid(conn)
        })
        .collect();
    for conn in &mut clients {
        conn.batch_execute("COMMIT").unwrap();
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(
        pids.len(),
        n,
        "the bouncer did not give each client its own server"
    );
    pids
}
