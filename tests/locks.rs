//! Two connections on one temporary file: how writes, reads and the WAL switch behave when
//! another connection holds the write lock.

mod common;

use std::time::{Duration, Instant};

use common::{bump, fresh_db, hold_write_lock, values, MIGRATIONS, VERSIONS};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use sqlite_persistence::{Error, JournalMode, Operation, Options, RetryPolicy};

/// Asserts `error` is the layer giving up on a `write` while the database stayed locked.
fn assert_busy_write(error: &Error) {
    assert!(
        matches!(
            error,
            Error::Busy {
                operation: Operation::Write,
                ..
            }
        ),
        "{error}"
    );
}

fn quick_busy() -> Options {
    // busy_timeout far below the hold, so the retry policy has to do the waiting.
    Options::new().busy_timeout(Duration::from_millis(50))
}

#[test]
fn write_outlasts_a_lock_held_longer_than_busy_timeout() {
    let (_dir, path) = fresh_db();
    let db = quick_busy().open(&path, MIGRATIONS).unwrap();
    let holder = hold_write_lock(&path, Duration::from_millis(600));
    let (value, stats) = bump(&db, "a").unwrap();
    holder.join().unwrap();
    assert_eq!(value, 1);
    assert!(stats.attempts > 1, "{stats:?}");
    assert!(stats.wait >= Duration::from_millis(400), "{stats:?}");
}

#[test]
fn a_lock_held_past_the_deadline_gives_the_typed_timeout_error_in_time() {
    let (_dir, path) = fresh_db();
    let deadline = Duration::from_millis(700);
    let db = quick_busy()
        .retry(RetryPolicy::new().max_elapsed(deadline))
        .open(&path, MIGRATIONS)
        .unwrap();
    let holder = hold_write_lock(&path, Duration::from_secs(3));
    let error = bump(&db, "a").unwrap_err();
    // Given up while the lock was still held (3 s), at the 700 ms deadline: behaviour, not
    // a bound on how fast a loaded machine runs.
    let still_held = !holder.is_finished();
    holder.join().unwrap();
    match &error {
        Error::Busy {
            operation,
            attempts,
            elapsed,
            ..
        } => {
            assert_eq!(*operation, Operation::Write);
            assert!(*attempts > 1);
            assert!(*elapsed >= deadline, "{elapsed:?}");
        }
        other => panic!("expected Busy, got {other}"),
    }
    assert!(error.is_lock_error());
    assert!(still_held, "the write waited out the holder: {error}");
    // Nothing was written, and the next write works.
    assert!(values(&db, "a").unwrap().is_empty());
    assert_eq!(bump(&db, "a").unwrap().0, 1);
}

#[test]
fn deferred_read_then_write_fails_at_once_where_write_waits() {
    let (_dir, path) = fresh_db();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    bump(&db, "a").unwrap();

    // Plain Diesel: a deferred transaction reads, another connection commits, the write
    // fails at once although busy_timeout is 5 s.
    let mut reader = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
    reader.batch_execute("PRAGMA busy_timeout = 5000").unwrap();
    let start = Instant::now();
    let outcome = reader.transaction(|conn| {
        diesel::sql_query("SELECT * FROM counters").execute(conn)?;
        bump(&db, "a").unwrap(); // another connection commits meanwhile
        diesel::sql_query("UPDATE counters SET value = value + 1").execute(conn)
    });
    let error = outcome.unwrap_err();
    assert!(sqlite_persistence::is_lock_error(&error), "{error}");
    assert!(start.elapsed() < Duration::from_secs(1), "it did not wait");

    // The layer's write runs the same read-then-write and succeeds.
    assert_eq!(bump(&db, "a").unwrap().0, 3);
}

#[test]
fn read_refuses_to_write_and_leaves_the_connection_writable() {
    let (_dir, path) = fresh_db();
    let db = Options::new().pool_size(1).open(&path, MIGRATIONS).unwrap();
    let error = db
        .read(|conn| -> sqlite_persistence::Result<usize> {
            Ok(diesel::sql_query("INSERT INTO counters (name) VALUES ('x')").execute(conn)?)
        })
        .unwrap_err();
    assert!(error.to_string().contains("query failed"), "{error}");
    assert!(common::chain(&error).contains("readonly"), "{error:?}");
    // The one pooled connection is writable again.
    assert_eq!(bump(&db, "a").unwrap().0, 1);
}

#[test]
fn wal_switch_waits_out_a_writer_on_a_rollback_journal_file() {
    let (_dir, path) = fresh_db();
    {
        let mut conn = common::plain_sqlite(&path);
        conn.batch_execute("CREATE TABLE t (x INTEGER)").unwrap();
    }
    let holder = hold_write_lock(&path, Duration::from_millis(500));
    // The file has a table of its own and no migration history: accepted explicitly.
    let db = quick_busy()
        .allow_unmanaged_tables(true)
        .open(&path, MIGRATIONS)
        .unwrap();
    holder.join().unwrap();
    assert_eq!(db.journal_mode(), JournalMode::Wal);
    assert_eq!(db.applied_at_open().len(), VERSIONS.len());
}

#[test]
fn a_wal_file_is_never_switched_back_at_run_time() {
    let (_dir, path) = fresh_db();
    Options::new().open(&path, MIGRATIONS).unwrap();
    let error = Options::new()
        .journal_mode(JournalMode::Delete)
        .open(&path, MIGRATIONS)
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::JournalMode {
                expected: JournalMode::Delete,
                actual: JournalMode::Wal,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.hint().unwrap().contains("leaving WAL"), "{error}");
}

#[test]
fn rollback_journal_mode_can_be_asked_for() {
    let (_dir, path) = fresh_db();
    let db = Options::new()
        .journal_mode(JournalMode::Delete)
        .open(&path, MIGRATIONS)
        .unwrap();
    assert_eq!(db.journal_mode(), JournalMode::Delete);
    assert_eq!(bump(&db, "a").unwrap().0, 1);
}

#[test]
fn a_zero_deadline_tries_once_and_reports_the_lock() {
    let (_dir, path) = fresh_db();
    let db = quick_busy()
        .retry(RetryPolicy::new().max_elapsed(Duration::ZERO))
        .open(&path, MIGRATIONS)
        .unwrap();
    let holder = hold_write_lock(&path, Duration::from_millis(800));
    let error = bump(&db, "a").unwrap_err();
    holder.join().unwrap();
    assert!(matches!(error, Error::Busy { attempts: 1, .. }), "{error}");
}

#[test]
fn a_stuck_queue_holder_gives_the_typed_timeout_error_within_the_deadline() {
    let (_dir, path) = fresh_db();
    let deadline = Duration::from_millis(600);
    let db = Options::new()
        .retry(RetryPolicy::new().max_elapsed(deadline))
        .open(&path, MIGRATIONS)
        .unwrap();
    // Something holds the queue and never lets go (until the test ends).
    let sidecar = format!("{}-lock", path.display());
    let stuck = std::fs::OpenOptions::new()
        .write(true)
        .open(sidecar)
        .unwrap();
    stuck.lock().unwrap();
    let start = Instant::now();
    let error = bump(&db, "a").unwrap_err();
    let took = start.elapsed();
    assert_busy_write(&error);
    assert!(common::chain(&error).contains("write queue"), "{error}");
    // It waited its deadline, and gave up (the holder never lets go: a generous bound is
    // only a bound on a hang).
    assert!(
        took >= deadline && took < deadline + Duration::from_secs(10),
        "{took:?}"
    );
    drop(stuck);
    assert_eq!(bump(&db, "a").unwrap().0, 1);
}

#[test]
fn a_write_gives_up_at_its_deadline_not_a_busy_timeout_later() {
    // The default busy_timeout (5 s) is longer than the deadline (1 s): one attempt inside
    // SQLite's busy handler must not run past the deadline.
    let (_dir, path) = fresh_db();
    let deadline = Duration::from_secs(1);
    let db = Options::new()
        .retry(RetryPolicy::new().max_elapsed(deadline))
        .open(&path, MIGRATIONS)
        .unwrap();
    let holder = hold_write_lock(&path, Duration::from_secs(4));
    let error = bump(&db, "a").unwrap_err();
    // Given up while the lock was still held (4 s), not a busy_timeout (5 s) past the
    // deadline: behaviour, not a bound on how fast a loaded machine runs.
    let still_held = !holder.is_finished();
    holder.join().unwrap();
    assert_busy_write(&error);
    assert!(still_held, "the write waited out the holder: {error}");
    // The connection's own busy_timeout is back: a write behind a short holder waits in
    // SQLite, in one attempt.
    let holder = hold_write_lock(&path, Duration::from_millis(300));
    let (value, stats) = bump(&db, "a").unwrap();
    holder.join().unwrap();
    assert_eq!((value, stats.attempts), (1, 1));
}

#[test]
fn waiting_for_the_pool_counts_against_the_same_deadline() {
    let (_dir, path) = fresh_db();
    let deadline = Duration::from_secs(3);
    let db = quick_busy()
        .pool_size(1)
        .retry(RetryPolicy::new().max_elapsed(deadline))
        .open(&path, MIGRATIONS)
        .unwrap();
    let holder = hold_write_lock(&path, Duration::from_secs(8));
    std::thread::scope(|s| {
        let (held, is_held) = std::sync::mpsc::channel();
        let db = &db;
        // The pool's only connection is busy for most of the deadline...
        s.spawn(move || {
            db.read(|_| -> sqlite_persistence::Result<()> {
                held.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(2500));
                Ok(())
            })
            .unwrap();
        });
        is_held.recv_timeout(Duration::from_secs(10)).unwrap();
        // ...and then the database is locked: the write gives up at its one deadline, not a
        // whole deadline after the pool wait.
        let start = Instant::now();
        let error = bump(db, "a").unwrap_err();
        let took = start.elapsed();
        assert_busy_write(&error);
        // A whole deadline after the pool wait would be 5.5 s: the margin is for a loaded
        // machine.
        assert!(took < deadline + Duration::from_millis(1500), "{took:?}");
    });
    holder.join().unwrap();
}

#[cfg(target_os = "linux")]
#[test]
fn a_write_that_gives_up_names_the_foreign_process_holding_the_lock() {
    use std::io::BufRead;
    let (_dir, path) = fresh_db();
    let db = quick_busy()
        .retry(RetryPolicy::new().max_elapsed(Duration::from_millis(500)))
        .open(&path, MIGRATIONS)
        .unwrap();
    // Another program (Python's sqlite3, not this crate) holds the write lock.
    let script = "import sqlite3, sys, time\n\
                  c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
                  c.execute('BEGIN IMMEDIATE')\n\
                  print('held', flush=True)\n\
                  time.sleep(10)\n";
    let Ok(mut holder) = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("no python3: nothing checked");
        return;
    };
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "held");
    let error = bump(&db, "a").unwrap_err();
    holder.kill().unwrap();
    holder.wait().unwrap();
    match &error {
        Error::Busy { holders, .. } => {
            let holder_pid = holders
                .iter()
                .find(|h| h.pid == holder.id())
                .unwrap_or_else(|| panic!("{holders:?}"));
            assert_eq!(holder_pid.lock, sqlite_persistence::HeldLock::WriteLock);
            assert!(holder_pid.command.as_deref().unwrap().starts_with("python"));
        }
        other => panic!("expected Busy, got {other}"),
    }
    assert!(
        error
            .to_string()
            .contains(&format!("by process {} (python", holder.id())),
        "only the foreign holder is named: {error}"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn writes_timing_out_behind_a_stuck_queue_holder_leave_no_threads_behind() {
    let threads = common::threads;
    let (_dir, path) = fresh_db();
    let db = Options::new()
        .retry(RetryPolicy::new().max_elapsed(Duration::from_millis(20)))
        .open(&path, MIGRATIONS)
        .unwrap();
    bump(&db, "warm").unwrap();
    let stuck = std::fs::OpenOptions::new()
        .read(true)
        .open(format!("{}-lock", path.display()))
        .unwrap();
    stuck.lock().unwrap();
    let before = threads();
    for _ in 0..100 {
        assert_busy_write(&bump(&db, "a").unwrap_err());
    }
    let after = threads();
    // One waiter thread for the queue, whatever the number of writes that gave up (other
    // tests of this file run threads of their own meanwhile: a little slack).
    assert!(
        after <= before + 4,
        "{before} threads before, {after} after"
    );
    drop(stuck);
    assert_eq!(bump(&db, "a").unwrap().0, 1);
}

/// Application error shapes a closure may return, each wrapping Diesel's error (and this
/// crate's, as `write` asks).
mod shapes {
    #[derive(Debug, thiserror::Error)]
    pub enum From {
        #[error("storage failed")]
        Db(#[from] diesel::result::Error),
        #[error("the database layer failed")]
        Layer(#[from] sqlite_persistence::Error),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("the job failed")]
    pub struct Source {
        #[source]
        pub source: Box<dyn std::error::Error + Send + Sync>,
    }

    impl std::convert::From<sqlite_persistence::Error> for Source {
        fn from(error: sqlite_persistence::Error) -> Self {
            Self {
                source: Box::new(error),
            }
        }
    }

    #[derive(Debug, thiserror::Error)]
    pub enum Nested {
        #[error("the service failed")]
        Inner(#[from] From),
    }

    impl std::convert::From<sqlite_persistence::Error> for Nested {
        fn from(error: sqlite_persistence::Error) -> Self {
            Nested::Inner(From::Layer(error))
        }
    }

    /// A message only.
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    pub struct Message(pub String);

    impl std::convert::From<sqlite_persistence::Error> for Message {
        fn from(error: sqlite_persistence::Error) -> Self {
            Message(error.to_string())
        }
    }
}

/// Where the closure's statement fails with a lock: a connection of another `Database` (the
/// layer prepared it), or a plain `SqliteConnection`.
#[derive(Clone, Copy, Debug)]
enum Other {
    Layer,
    Plain,
}

/// A `write` whose closure runs its statement on `other`'s connection to a second file whose
/// write lock another connection holds until the closure's first failure; returns the
/// closure's attempts and whether the write succeeded.
fn write_failing_elsewhere<E: std::fmt::Debug + From<Error> + 'static>(
    other: Other,
    wrap: fn(diesel::result::Error) -> E,
) -> (u32, bool) {
    let (_dir, path) = fresh_db();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    let (_other_dir, other_path) = fresh_db();
    let other_db = quick_busy().open(&other_path, MIGRATIONS).unwrap();
    let mut held = Some(common::hold_lock_until_released(
        &other_path,
        "BEGIN IMMEDIATE",
    ));
    let mut attempts = 0;
    let insert = || diesel::sql_query("INSERT INTO counters (name) VALUES ('elsewhere')");
    let result = db.write(|_conn| -> Result<(), E> {
        attempts += 1;
        let outcome = match other {
            Other::Layer => insert().execute(&mut *other_db.connection().unwrap()),
            Other::Plain => {
                let mut conn = common::plain_sqlite(&other_path);
                conn.batch_execute("PRAGMA busy_timeout = 50").unwrap();
                insert().execute(&mut conn)
            }
        };
        // The next attempt finds the file free.
        if let Some(held) = held.take() {
            held.release();
        }
        outcome.map(drop).map_err(wrap)
    });
    if let Some(held) = held.take() {
        held.release();
    }
    (attempts, result.is_ok())
}

/// A lock met inside a `write` on another connection (another `Database`'s, here of a second
/// file) is retried whatever the closure's error type: every connection the layer prepared
/// records its failures for its thread. It was retried only when the closure returned this
/// crate's `Error`; an enum with `#[from]`, a `#[source]` field, a nested error, `anyhow`
/// and a string failed at once. On a plain connection only the error value can tell:
/// Diesel's error, this crate's, or a boxed one (and their source chains) are retried, an
/// application's own type is returned at once, as the docs say.
#[test]
fn a_lock_on_another_connection_is_retried_whatever_the_error_type_the_layer_can_see() {
    fn check<E: std::fmt::Debug + From<Error> + 'static>(
        name: &str,
        wrap: fn(diesel::result::Error) -> E,
        retried_on_plain: bool,
    ) {
        assert_eq!(
            write_failing_elsewhere(Other::Layer, wrap),
            (2, true),
            "{name} on another Database's connection"
        );
        let (attempts, ok) = write_failing_elsewhere(Other::Plain, wrap);
        if retried_on_plain {
            assert_eq!((attempts, ok), (2, true), "{name} on a plain connection");
        } else {
            assert_eq!((attempts, ok), (1, false), "{name} on a plain connection");
        }
    }
    check("diesel::result::Error", |e| e, true);
    check("sqlite_persistence::Error", Error::from, true);
    check(
        "Box<dyn Error + Send + Sync>",
        |e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) },
        true,
    );
    check("#[from]", shapes::From::from, false);
    check(
        "#[source]",
        |e| shapes::Source {
            source: Box::new(e),
        },
        false,
    );
    check(
        "nested",
        |e| shapes::Nested::from(shapes::From::from(e)),
        false,
    );
    check("anyhow::Error", anyhow::Error::from, false);
    check("a message", |e| shapes::Message(e.to_string()), false);
}

/// A `write` of a second handle of the same file, nested in the first one's `write`, is
/// `Error::Reentrant` at once: it would wait for the lock the outer write holds until its
/// deadline (30 s by default), blaming its own process. A nested write of another file
/// works.
#[test]
fn a_nested_write_of_the_same_file_through_another_handle_is_refused_at_once() {
    let (_dir, path) = fresh_db();
    let first = Options::new().open(&path, MIGRATIONS).unwrap();
    let second = Options::new().open(&path, MIGRATIONS).unwrap();
    let (_other_dir, other_path) = fresh_db();
    let other = Options::new().open(&other_path, MIGRATIONS).unwrap();
    let nested = first
        .write(|_| -> sqlite_persistence::Result<_> {
            let inner = bump(&second, "a");
            Ok((
                inner.map(|(value, _)| value),
                bump(&other, "b").map(|(v, _)| v),
            ))
        })
        .unwrap();
    match nested.0 {
        Err(Error::Reentrant {
            operation: Operation::Write,
            outer: Operation::Write,
        }) => {}
        other => panic!("expected Reentrant, got {other:?}"),
    }
    assert_eq!(nested.1.unwrap(), 1);
    // Outside the outer write, the second handle writes as any.
    assert_eq!(bump(&second, "a").unwrap().0, 1);
}
