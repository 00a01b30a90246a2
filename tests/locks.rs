//! Two connections on one temporary file: how writes, reads and the WAL switch behave when
//! another connection holds the write lock.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use sqlite_persistence::{Catalog, Error, JournalMode, Options, RetryPolicy};

/// Holds a write lock on `db` from another connection for `hold`, on its own thread;
/// returns once the lock is held.
fn hold_write_lock(db: &std::path::Path, hold: Duration) -> thread::JoinHandle<()> {
    let url = db.to_str().unwrap().to_owned();
    let (locked, is_locked) = mpsc::channel();
    let holder = thread::spawn(move || {
        let mut conn = SqliteConnection::establish(&url).unwrap();
        conn.batch_execute("BEGIN IMMEDIATE").unwrap();
        locked.send(()).unwrap();
        thread::sleep(hold);
        conn.batch_execute("COMMIT").unwrap();
    });
    is_locked.recv_timeout(Duration::from_secs(10)).unwrap();
    holder
}

fn quick_busy() -> Options {
    // busy_timeout far below the hold, so the retry policy has to do the waiting.
    Options::new().busy_timeout(Duration::from_millis(50))
}

#[test]
fn write_outlasts_a_lock_held_longer_than_busy_timeout() {
    let (_dir, db) = common::fresh_db();
    let catalog = Catalog::open(&db, quick_busy()).unwrap();
    let holder = hold_write_lock(&db, Duration::from_millis(600));
    let recorded = catalog.record("a").unwrap();
    holder.join().unwrap();
    assert_eq!(recorded.version, 1);
    assert!(recorded.attempts > 1, "{recorded:?}");
    assert!(recorded.wait >= Duration::from_millis(400), "{recorded:?}");
}

#[test]
fn a_lock_held_past_the_deadline_gives_the_typed_timeout_error_in_time() {
    let (_dir, db) = common::fresh_db();
    let deadline = Duration::from_millis(700);
    let catalog = Catalog::open(
        &db,
        quick_busy().retry(RetryPolicy::new().max_elapsed(deadline)),
    )
    .unwrap();
    let holder = hold_write_lock(&db, Duration::from_secs(3));
    let start = Instant::now();
    let error = catalog.record("a").unwrap_err();
    let took = start.elapsed();
    holder.join().unwrap();
    match &error {
        Error::Busy {
            operation,
            attempts,
            elapsed,
            ..
        } => {
            assert_eq!(*operation, "write");
            assert!(*attempts > 1);
            assert!(*elapsed >= deadline, "{elapsed:?}");
        }
        other => panic!("expected Busy, got {other}"),
    }
    assert!(error.is_lock_error());
    // One attempt can block busy_timeout (50 ms) past the deadline; no hang.
    assert!(took < deadline + Duration::from_millis(500), "{took:?}");
    // Nothing was written, and the next write works.
    assert!(catalog.versions("a").unwrap().is_empty());
    assert_eq!(catalog.record("a").unwrap().version, 1);
}

#[test]
fn deferred_read_then_write_fails_at_once_where_write_waits() {
    let (_dir, db) = common::fresh_db();
    let catalog = Catalog::open(&db, Options::new()).unwrap();
    catalog.record("a").unwrap();

    // Plain Diesel: a deferred transaction reads, another connection commits, the write
    // fails at once although busy_timeout is 5 s.
    let mut reader = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
    reader.batch_execute("PRAGMA busy_timeout = 5000").unwrap();
    let start = Instant::now();
    let outcome = reader.transaction(|conn| {
        diesel::sql_query("SELECT * FROM artifacts").execute(conn)?;
        catalog.record("a").unwrap(); // another connection commits meanwhile
        diesel::sql_query("UPDATE artifacts SET latest_version = latest_version + 1").execute(conn)
    });
    let error = outcome.unwrap_err();
    assert!(sqlite_persistence::is_lock_error(&error), "{error}");
    assert!(start.elapsed() < Duration::from_secs(1), "it did not wait");

    // The layer's write runs the same read-then-write and succeeds.
    assert_eq!(catalog.record("a").unwrap().version, 3);
}

#[test]
fn read_refuses_to_write_and_leaves_the_connection_writable() {
    let (_dir, db) = common::fresh_db();
    let catalog = Catalog::open(&db, Options::new().pool_size(1)).unwrap();
    let error = catalog
        .database()
        .read(|conn| -> sqlite_persistence::Result<usize> {
            Ok(diesel::sql_query("INSERT INTO artifacts (name) VALUES ('x')").execute(conn)?)
        })
        .unwrap_err();
    assert!(error.to_string().contains("query failed"), "{error}");
    assert!(
        sqlite_persistence::error_chain(&error).contains("readonly"),
        "{error:?}"
    );
    // The one pooled connection is writable again.
    assert_eq!(catalog.record("a").unwrap().version, 1);
}

#[test]
fn wal_switch_waits_out_a_writer_on_a_rollback_journal_file() {
    let (_dir, db) = common::fresh_db();
    {
        let mut conn = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
        conn.batch_execute("CREATE TABLE t (x INTEGER)").unwrap();
    }
    let holder = hold_write_lock(&db, Duration::from_millis(500));
    let catalog = Catalog::open(&db, quick_busy()).unwrap();
    holder.join().unwrap();
    assert_eq!(catalog.database().journal_mode(), JournalMode::Wal);
    assert_eq!(catalog.database().applied_at_open().len(), 3);
}

#[test]
fn a_wal_file_is_never_switched_back_at_run_time() {
    let (_dir, db) = common::fresh_db();
    Catalog::open(&db, Options::new()).unwrap();
    let error = Catalog::open(&db, Options::new().journal_mode(JournalMode::Delete)).unwrap_err();
    assert!(matches!(error, Error::JournalMode { .. }), "{error}");
    assert!(error.to_string().contains("leaving WAL"), "{error}");
}

#[test]
fn rollback_journal_mode_can_be_asked_for() {
    let (_dir, db) = common::fresh_db();
    let catalog = Catalog::open(&db, Options::new().journal_mode(JournalMode::Delete)).unwrap();
    assert_eq!(catalog.database().journal_mode(), JournalMode::Delete);
    assert_eq!(catalog.record("a").unwrap().version, 1);
}

#[test]
fn a_zero_deadline_tries_once_and_reports_the_lock() {
    let (_dir, db) = common::fresh_db();
    let options = quick_busy().retry(RetryPolicy::new().max_elapsed(Duration::ZERO));
    let catalog = Catalog::open(&db, options).unwrap();
    let holder = hold_write_lock(&db, Duration::from_millis(800));
    let error = catalog.record("a").unwrap_err();
    holder.join().unwrap();
    assert!(matches!(error, Error::Busy { attempts: 1, .. }), "{error}");
}
