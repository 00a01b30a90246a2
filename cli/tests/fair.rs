//! The fair queue's guarantees across real processes (not its speed): released when a
//! holder dies, and never needed for correctness. (Bounded under a stuck holder: the
//! library's own `tests/locks.rs`.)

mod common;

use std::fs::OpenOptions;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sqlite_persistence::Options;
use sqlite_persistence_cli::Catalog;

fn sidecar(db: &std::path::Path) -> std::path::PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-lock");
    name.into()
}

/// Starts a real process of the binary that takes the queue and the write lock of `db` and
/// holds them `hold_ms`; returns once it holds the queue (waiting at most 20 s).
fn holder_of_the_queue(db: &std::path::Path, hold_ms: u32) -> std::process::Child {
    let holder = Command::new(common::binary())
        .args(["record", "--artifact", "a", "--hold-ms"])
        .arg(hold_ms.to_string())
        .arg("--db")
        .arg(db)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let probe = OpenOptions::new().read(true).open(sidecar(db)).unwrap();
    let start = Instant::now();
    while probe.try_lock().is_ok() {
        probe.unlock().unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the child never took the queue"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    holder
}

#[test]
fn a_holder_killed_mid_transaction_releases_the_queue_and_the_database() {
    let (_dir, db) = common::fresh_db();
    let catalog = Catalog::open(&db, Options::new()).unwrap();
    // A real process takes the queue and the write lock and holds them 20 s...
    let mut holder = holder_of_the_queue(&db, 20_000);
    // ...and is killed (SIGKILL) while holding them.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let start = Instant::now();
    let recorded = catalog.record("a").unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(recorded.version, 1, "the killed transaction left nothing");
}

#[test]
fn writers_without_the_queue_and_with_it_still_interoperate() {
    // Half the processes ignore the sidecar (as a foreign program would); SQLite's locks and
    // the retry policy keep the versions distinct and gapless.
    let (_dir, db) = common::fresh_db();
    Catalog::open(&db, Options::new()).unwrap();
    let outcomes = common::storm_each(
        24,
        &db,
        |i| {
            let mut args = vec![
                "record",
                "--artifact",
                "a",
                "--count",
                "5",
                "--hold-ms",
                "1",
            ];
            if i % 2 == 1 {
                args.push("--no-fair-queue");
            }
            args
        },
        &[],
        Duration::from_secs(120),
    );
    let failures = common::failure_causes(&outcomes);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        common::stored_versions(&db),
        (1..=120).collect::<Vec<i64>>()
    );
}

#[cfg(target_os = "linux")]
#[test]
fn a_write_that_gives_up_behind_a_writer_of_this_crate_names_it() {
    let (_dir, db) = common::fresh_db();
    let catalog = Catalog::open(
        &db,
        Options::new()
            .retry(sqlite_persistence::RetryPolicy::new().max_elapsed(Duration::from_millis(600))),
    )
    .unwrap();
    let mut holder = holder_of_the_queue(&db, 5000);
    let error = catalog.record("a").unwrap_err();
    holder.kill().unwrap();
    holder.wait().unwrap();
    let text = error.to_string();
    assert!(
        text.contains(&format!("by process {} (sqlite-persiste", holder.id()))
            && text.contains("holding the write queue for ")
            && text.contains(" s (write)"),
        "{text}"
    );
}
