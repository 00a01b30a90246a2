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
    let dir = db.parent().unwrap();
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

/// Waits for every child, killing all of them if `limit` passes first.
pub fn collect(children: Vec<Child>, limit: Duration) -> Vec<Outcome> {
    let deadline = Instant::now() + limit;
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    loop {
        let running = children
            .iter_mut()
            .filter_map(|c| c.as_mut())
            .map(|c| c.try_wait().unwrap().is_none())
            .filter(|&still| still)
            .count();
        if running == 0 {
            break;
        }
        if Instant::now() > deadline {
            for child in children.iter_mut().flatten() {
                let _ = child.kill();
            }
            panic!("{running} processes still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    children
        .into_iter()
        .map(|c| {
            let output = c.unwrap().wait_with_output().unwrap();
            Outcome {
                success: output.status.success(),
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            }
        })
        .collect()
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

/// Runs one SQL query with Diesel on its own connection and returns the rows' first column.
pub fn query_strings(db: &Path, sql: &str) -> Vec<String> {
    use diesel::prelude::*;
    use diesel::sql_types::Text;
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        value: String,
    }
    let mut conn = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
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
