//! Helpers for the cross-process tests: start many real processes of the binary together
//! on a barrier, with every wait bounded.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What one child process did.
#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_sqlite-persistence")
}

/// Starts `n` processes of the binary with `args` (plus `--db db`), waits until every one
/// is ready at the barrier, releases them at once, and collects them. Panics if any is
/// not ready within 60 s or not done within `limit` (after killing the rest).
pub fn storm(
    n: usize,
    db: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> Vec<Outcome> {
    storm_each(n, db, |_| args.to_vec(), env, limit)
}

/// [`storm`] where process `i` gets the arguments `args(i)`.
pub fn storm_each<'a>(
    n: usize,
    db: &Path,
    args: impl Fn(usize) -> Vec<&'a str>,
    env: &[(&str, &str)],
    limit: Duration,
) -> Vec<Outcome> {
    storm_at(n, db.parent().unwrap(), db.as_os_str(), args, env, limit)
}

/// [`storm_each`] on the database `db` (a file or a URL), the barrier's files in `dir`.
pub fn storm_at<'a>(
    n: usize,
    dir: &Path,
    db: &std::ffi::OsStr,
    args: impl Fn(usize) -> Vec<&'a str>,
    env: &[(&str, &str)],
    limit: Duration,
) -> Vec<Outcome> {
    let barrier = dir.join(format!("barrier-{}", unique()));
    let children: Vec<Child> = (0..n)
        .map(|i| {
            let mut command = Command::new(binary());
            command
                .args(args(i))
                .arg("--db")
                .arg(db)
                .arg("--barrier")
                .arg(&barrier)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for (key, value) in env {
                command.env(key, value);
            }
            command.spawn().expect("spawn the binary")
        })
        .collect();
    let ready_prefix = format!("{}.ready-", barrier.file_name().unwrap().to_str().unwrap());
    let start = Instant::now();
    loop {
        let ready = std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_str()
                    .unwrap()
                    .starts_with(&ready_prefix)
            })
            .count();
        if ready == n {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {ready} of {n} reached the barrier"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::write(&barrier, b"go").unwrap();
    collect(children, limit)
}

/// Waits for every child, killing all of them if `limit` passes first. Output is read
/// while they run, so that no child blocks on a full pipe.
pub fn collect(children: Vec<Child>, limit: Duration) -> Vec<Outcome> {
    let deadline = Instant::now() + limit;
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let mut running: Vec<_> = children
        .into_iter()
        .map(|mut c| {
            let out = drain(
                c.stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            );
            let err = drain(
                c.stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            );
            (c, out, err)
        })
        .collect();
    let mut outcomes = Vec::new();
    while !running.is_empty() {
        let mut i = 0;
        while i < running.len() {
            match running[i].0.try_wait().unwrap() {
                Some(status) => {
                    let (_, out, err) = running.swap_remove(i);
                    outcomes.push(Outcome {
                        success: status.success(),
                        stdout: out.join().unwrap(),
                        stderr: err.join().unwrap(),
                    });
                }
                None => i += 1,
            }
        }
        if Instant::now() > deadline {
            let still = running.len();
            for (child, _, _) in running.iter_mut() {
                let _ = child.kill();
            }
            panic!("{still} processes still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    outcomes
}

fn unique() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh temporary directory and a database path in it.
pub fn fresh_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("catalog.db");
    (dir, db)
}

/// The names in `dir`, sorted.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Runs one SQL query with Diesel on its own connection and returns the rows' first column.
pub fn query_strings(db: &Path, sql: &str) -> Vec<String> {
    use diesel::prelude::*;
    use diesel::sql_types::Text;
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        value: String,
    }
    use diesel::connection::SimpleConnection;
    let mut conn = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
    // Another connection may be closing (and checkpointing) at this moment: wait for it.
    conn.batch_execute("PRAGMA busy_timeout = 5000").unwrap();
    diesel::sql_query(sql)
        .load::<Row>(&mut conn)
        .unwrap()
        .into_iter()
        .map(|r| r.value)
        .collect()
}

/// The first line of each failure's stderr, counted by cause.
pub fn failure_causes(outcomes: &[Outcome]) -> Vec<(String, usize)> {
    let mut causes = std::collections::BTreeMap::new();
    for o in outcomes.iter().filter(|o| !o.success) {
        let line = o
            .stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or("(no error line)");
        *causes.entry(line.to_owned()).or_insert(0) += 1;
    }
    causes.into_iter().collect()
}

/// Waits (at most 10 s) until every connection to `db` is closed, which SQLite marks by
/// checkpointing and removing `-wal`. r2d2 may close a dropped pool's last connection a
/// moment later on its own thread (its worker holds the pool while it connects), so a test
/// that compares a file's bytes after dropping a `Database` waits for this first.
pub fn wait_closed(db: &Path) {
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    let start = Instant::now();
    while wal.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} still open after 10 s",
            db.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The user id the unprivileged runs use.
#[cfg(unix)]
pub const NOBODY: u32 = 65534;

/// Whether the tests run as root (root may write any file, so a read-only file means nothing
/// to it).
#[cfg(unix)]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs the binary, with what `configure` adds, as `nobody` when the tests run as root, else
/// as it is, and waits for its output. As root it runs a copy in a world-readable temporary
/// directory (removed afterwards), from `/`: the checkout, and so the built binary, may be in
/// a directory other users cannot enter.
#[cfg(unix)]
pub fn output_unprivileged(
    configure: impl FnOnce(&mut Command) -> &mut Command,
) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    if !is_root() {
        return configure(&mut Command::new(binary())).output().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let copy = dir.path().join("sqlite-persistence");
    std::fs::copy(binary(), &copy).unwrap();
    set_mode(&copy, 0o755);
    let mut command = Command::new(&copy);
    configure(&mut command)
        .current_dir("/")
        .uid(NOBODY)
        .gid(NOBODY);
    // Another test may fork while the copy is open for writing: its child holds that
    // descriptor until it execs, and exec of the copy fails with ETXTBSY meanwhile.
    let start = Instant::now();
    loop {
        match command.output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                assert!(start.elapsed() < Duration::from_secs(10), "{e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result.unwrap(),
        }
    }
}

/// `command` runs with `resource` limited to `value` (`setrlimit` in the child, before exec).
#[cfg(target_os = "linux")]
pub fn limit(
    command: &mut Command,
    resource: libc::__rlimit_resource_t,
    value: libc::rlim_t,
) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec, only setrlimit, which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

#[cfg(unix)]
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The catalog's stored versions of every artifact, ascending.
pub fn stored_versions(db: &Path) -> Vec<i64> {
    query_strings(
        db,
        "SELECT CAST(version AS TEXT) AS value FROM artifact_versions ORDER BY version",
    )
    .into_iter()
    .map(|v| v.parse().unwrap())
    .collect()
}

/// Asserts a finished command succeeded, showing its stderr if not.
pub fn assert_success(output: &std::process::Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
