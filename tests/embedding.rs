//! The promises an application relies on when it embeds the layer: retry whatever its error
//! type (and only of real locks, told by SQLite's result code), nested calls refused at once
//! instead of hanging, no process holding the write turn while it waits for its own pool, a
//! panicking read leaving no read-only connection behind, any deadline accepted, a clean
//! exit, the durable setting in force when asked.

mod common;

use std::time::{Duration, Instant};

use common::{bump, bump_in, fresh_db, hold_lock, hold_write_lock, values, MIGRATIONS};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use sqlite_persistence::{Database, Error, JournalMode, Operation, Options, RetryPolicy};

/// The most common application error: Diesel's error and the layer's, both transparent, so
/// that neither is in the source chain the retry loop walks.
#[derive(Debug, thiserror::Error)]
enum Transparent {
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
    #[error(transparent)]
    Layer(#[from] sqlite_persistence::Error),
}

/// An application error that keeps only Diesel's message.
#[derive(Debug, thiserror::Error)]
enum Stringly {
    #[error("database: {0}")]
    Db(String),
    #[error("layer: {0}")]
    Layer(String),
}

impl From<diesel::result::Error> for Stringly {
    fn from(error: diesel::result::Error) -> Self {
        Stringly::Db(error.to_string())
    }
}

impl From<sqlite_persistence::Error> for Stringly {
    fn from(error: sqlite_persistence::Error) -> Self {
        Stringly::Layer(error.to_string())
    }
}

/// busy_timeout far below the foreign hold: only the layer's retry can outlast it.
fn quick_busy() -> Options {
    Options::new().busy_timeout(Duration::from_millis(100))
}

#[test]
fn a_lock_on_begin_is_retried_whatever_the_callers_error_type() {
    let (_dir, path) = fresh_db();
    let db = quick_busy().open(&path, MIGRATIONS).unwrap();
    let hold = Duration::from_millis(1200);

    let holder = hold_write_lock(&path, hold);
    let start = Instant::now();
    let value = db
        .write(|conn| -> Result<i64, Transparent> { Ok(bump_in(conn, "a")?) })
        .unwrap();
    holder.join().unwrap();
    assert_eq!(value, 1);
    assert!(start.elapsed() >= hold - Duration::from_millis(300));

    let holder = hold_write_lock(&path, hold);
    let value = db
        .write(|conn| -> Result<i64, Stringly> { Ok(bump_in(conn, "a")?) })
        .unwrap();
    holder.join().unwrap();
    assert_eq!(value, 2);
    assert_eq!(values(&db, "a").unwrap(), [1, 2]);
}

/// A read with the error type it names, its error shown as a string.
type ReadAs = fn(&Database) -> Result<Vec<i64>, String>;

/// Reads the `a` counter's values in `db`'s read transaction, as `E`.
fn read_values<E>(db: &Database) -> Result<Vec<i64>, E>
where
    E: From<Error> + From<diesel::result::Error> + 'static,
{
    use common::schema::events;
    db.read(|conn| -> Result<Vec<i64>, E> { Ok(events::table.select(events::value).load(conn)?) })
}

#[test]
fn a_lock_inside_the_closure_is_retried_whatever_the_callers_error_type() {
    // In rollback-journal mode a writer's EXCLUSIVE lock stops readers at their first
    // SELECT, inside the closure, where only the closure's error type carries the error.
    let (_dir, path) = fresh_db();
    let db = quick_busy()
        .journal_mode(JournalMode::Delete)
        .open(&path, MIGRATIONS)
        .unwrap();
    bump(&db, "a").unwrap();
    let hold = Duration::from_millis(600);
    let reads: [(&str, ReadAs); 6] = [
        ("Transparent", |db| {
            read_values::<Transparent>(db).map_err(|e| e.to_string())
        }),
        ("Stringly", |db| {
            read_values::<Stringly>(db).map_err(|e| e.to_string())
        }),
        ("anyhow::Error", |db| {
            read_values::<anyhow::Error>(db).map_err(|e| e.to_string())
        }),
        ("Box<dyn Error>", |db| {
            read_values::<Box<dyn std::error::Error>>(db).map_err(|e| e.to_string())
        }),
        ("Box<dyn Error + Send + Sync>", |db| {
            read_values::<Box<dyn std::error::Error + Send + Sync>>(db).map_err(|e| e.to_string())
        }),
        ("QueryResult", |db| {
            read_values::<diesel::result::Error>(db).map_err(|e| e.to_string())
        }),
    ];
    for (name, read) in reads {
        let holder = hold_lock(&path, "BEGIN EXCLUSIVE", hold);
        let start = Instant::now();
        let seen = read(&db);
        holder.join().unwrap();
        assert_eq!(seen.as_deref(), Ok(&[1][..]), "{name}");
        assert!(
            start.elapsed() >= hold - Duration::from_millis(300),
            "{name}"
        );
    }
}

#[test]
fn a_trigger_raising_database_is_locked_is_not_taken_for_a_lock() {
    let (_dir, path) = fresh_db();
    let db = Options::new()
        .retry(RetryPolicy::new().max_elapsed(Duration::from_secs(5)))
        .open(&path, MIGRATIONS)
        .unwrap();
    db.write(|conn| -> sqlite_persistence::Result<()> {
        diesel::sql_query(
            "CREATE TRIGGER refuse BEFORE INSERT ON counters WHEN NEW.name = 'refused' \
             BEGIN SELECT RAISE(ABORT, 'database is locked'); END",
        )
        .execute(conn)?;
        Ok(())
    })
    .unwrap();
    for kind in ["Error", "Transparent", "anyhow::Error"] {
        let start = Instant::now();
        let message = match kind {
            "Error" => bump_with::<Error>(&db).map_err(|e| format!("{e:?}")),
            "Transparent" => bump_with::<Transparent>(&db).map_err(|e| format!("{e:?}")),
            _ => bump_with::<anyhow::Error>(&db).map_err(|e| format!("{e:?}")),
        }
        .unwrap_err();
        // Returned at once as the trigger's error, not retried until the deadline.
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{kind}: {:?}",
            start.elapsed()
        );
        assert!(!message.contains("Busy"), "{kind}: {message}");
        assert!(message.contains("database is locked"), "{kind}: {message}");
    }
    // The layer's classifier by message cannot tell, as documented.
    let error = db
        .connection()
        .unwrap()
        .batch_execute("INSERT INTO counters (name) VALUES ('refused')");
    assert!(sqlite_persistence::is_lock_error(&error.unwrap_err()));
}

fn bump_with<E>(db: &Database) -> Result<i64, E>
where
    E: From<Error> + From<diesel::result::Error> + 'static,
{
    db.write(|conn| -> Result<i64, E> { Ok(bump_in(conn, "refused")?) })
}

#[test]
fn nested_calls_on_one_thread_are_refused_at_once_and_the_outer_call_goes_on() {
    let (_dir, path) = fresh_db();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    let start = Instant::now();
    let nested = db
        .write(|conn| -> sqlite_persistence::Result<Vec<Error>> {
            let mut refused = Vec::new();
            refused.push(bump(&db, "inner").unwrap_err());
            refused.push(
                db.read(|_| -> sqlite_persistence::Result<()> { Ok(()) })
                    .unwrap_err(),
            );
            refused.push(db.connection().map(drop).unwrap_err());
            bump_in(conn, "outer")?;
            Ok(refused)
        })
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let operations: Vec<_> = nested
        .iter()
        .map(|e| match e {
            Error::Reentrant { operation, outer } => {
                assert_eq!(*outer, Operation::Write, "{e}");
                assert!(e
                    .hint()
                    .unwrap()
                    .contains("connection the closure is given"));
                *operation
            }
            other => panic!("expected Reentrant, got {other}"),
        })
        .collect();
    assert_eq!(
        operations,
        [Operation::Write, Operation::Read, Operation::Connection]
    );
    let inside_read = db
        .read(|_| -> sqlite_persistence::Result<Error> { Ok(bump(&db, "x").unwrap_err()) })
        .unwrap();
    assert!(
        matches!(
            inside_read,
            Error::Reentrant {
                operation: Operation::Write,
                outer: Operation::Read
            }
        ),
        "{inside_read}"
    );
    // The outer write committed; the handle is usable again.
    assert_eq!(values(&db, "outer").unwrap(), [1]);
    assert!(values(&db, "inner").unwrap().is_empty());
    assert_eq!(bump(&db, "outer").unwrap().0, 2);
    // Two handles are two databases to the check: a read of another handle inside a write
    // is allowed (it sees the last commit).
    let other = Options::new().open(&path, MIGRATIONS).unwrap();
    let seen = db
        .write(|conn| -> sqlite_persistence::Result<Vec<i64>> {
            bump_in(conn, "outer")?;
            values(&other, "outer")
        })
        .unwrap();
    assert_eq!(seen, [1, 2]);
}

#[test]
fn a_write_waiting_for_its_own_pool_does_not_hold_the_write_turn() {
    let (_dir, path) = fresh_db();
    let busy_pool = Options::new().pool_size(1).open(&path, MIGRATIONS).unwrap();
    let other = Options::new().open(&path, MIGRATIONS).unwrap();
    bump(&other, "b").unwrap();
    let (busy_pool, other) = (&busy_pool, &other);
    std::thread::scope(|s| {
        // The pool's only connection is held by a long read...
        let (held, is_held) = std::sync::mpsc::channel();
        s.spawn(move || {
            busy_pool
                .read(|_| -> sqlite_persistence::Result<()> {
                    held.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(4000));
                    Ok(())
                })
                .unwrap();
        });
        is_held.recv_timeout(Duration::from_secs(10)).unwrap();
        // ...so this write waits for it,
        let waiting = s.spawn(move || bump(busy_pool, "a").unwrap().0);
        std::thread::sleep(Duration::from_millis(200));
        // while another writer of the file (its own pool, its own place in the queue) is not
        // held up behind it.
        let start = Instant::now();
        assert_eq!(bump(other, "b").unwrap().0, 2);
        // Held behind the waiting write, it would take the read's remaining 3.8 s: the
        // margin is for a loaded machine.
        assert!(
            start.elapsed() < Duration::from_millis(2500),
            "{:?}: the waiting write held the turn",
            start.elapsed()
        );
        assert_eq!(waiting.join().unwrap(), 1);
    });
}

#[test]
fn a_panicking_read_leaves_no_read_only_connection_in_the_pool() {
    let (_dir, path) = fresh_db();
    let db = Options::new().pool_size(1).open(&path, MIGRATIONS).unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        db.read(|_| -> sqlite_persistence::Result<()> { panic!("a bug in the closure") })
    }));
    assert!(panicked.is_err());
    #[derive(QueryableByName)]
    struct QueryOnly {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        query_only: i32,
    }
    let mut conn = db.connection().unwrap();
    let row: QueryOnly = diesel::sql_query("PRAGMA query_only")
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(row.query_only, 0);
    drop(conn);
    assert_eq!(bump(&db, "a").unwrap().0, 1);
}

#[test]
fn a_deadline_of_duration_max_means_wait_as_long_as_it_takes() {
    let (_dir, path) = fresh_db();
    let db = Options::new()
        .retry(RetryPolicy::new().max_elapsed(Duration::MAX))
        .open(&path, MIGRATIONS)
        .unwrap();
    let holder = hold_write_lock(&path, Duration::from_millis(300));
    assert_eq!(bump(&db, "a").unwrap().0, 1);
    holder.join().unwrap();
    let memory = Database::open(":memory:", MIGRATIONS).unwrap();
    assert_eq!(bump(&memory, "a").unwrap().0, 1);
}

/// Not a test on its own: the child role of the clean-exit test. With `EMBEDDING_EXIT_DB`
/// set, it opens the database, writes, drops the handle and exits at once.
#[test]
#[ignore = "run as a child process by the clean-exit test"]
fn exit_after_drop_child() {
    let Ok(path) = std::env::var("EMBEDDING_EXIT_DB") else {
        return;
    };
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    bump(&db, "a").unwrap();
    drop(db);
    std::process::exit(0);
}

#[test]
fn a_process_that_exits_right_after_dropping_the_database_leaves_its_writes_in_the_file() {
    for trial in 0..60 {
        let (dir, path) = fresh_db();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["exit_after_drop_child", "--exact", "--ignored"])
            .env("EMBEDDING_EXIT_DB", &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "trial {trial}");
        // The database file alone (as a copy of it without `-wal` would be) holds the write:
        // the last connection closed, and checkpointed, before the process exited.
        let copy = dir.path().join("copy.db");
        std::fs::copy(&path, &copy).unwrap();
        assert_eq!(
            common::query_strings(&copy, "SELECT CAST(value AS TEXT) AS value FROM counters"),
            ["1"],
            "trial {trial}"
        );
    }
}

#[test]
fn close_returns_once_every_connection_is_closed_or_says_which_stayed_open() {
    let (_dir, path) = fresh_db();
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    bump(&db, "a").unwrap();
    db.close().unwrap();
    let wal = format!("{}-wal", path.display());
    assert!(
        !std::path::Path::new(&wal).exists(),
        "the last connection checkpointed and removed the WAL"
    );

    // With the default 30 s deadline: close does not wait for a connection the application
    // holds (it waited the whole deadline, and named none), and names where it was taken.
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    let held = std::thread::Builder::new()
        .name("holder".into())
        .spawn({
            let pool = db.pool().unwrap().clone();
            move || pool.get().unwrap()
        })
        .unwrap()
        .join()
        .unwrap();
    let start = Instant::now();
    let error = db.close().unwrap_err();
    let message = error.to_string();
    match error {
        Error::StillOpen {
            connections, lent, ..
        } => {
            assert_eq!(connections, 1, "{message}");
            assert_eq!(lent.len(), 1, "{message}");
        }
        other => panic!("expected StillOpen, got {other:?}"),
    }
    assert!(
        message.contains("taken with Database::connection or from Database::pool on thread holder"),
        "{message}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    drop(held);
    // A clone of the pool keeps its idle connections: named after a short grace.
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    let pool = db.pool().unwrap().clone();
    drop(pool.get().unwrap());
    let start = Instant::now();
    let message = db.close().unwrap_err().to_string();
    assert!(
        message.contains("1 idle in a pool that a clone of Database::pool keeps"),
        "{message}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    drop(pool);
    // A handle dropped while the application holds a connection does not wait for it.
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    let held = db.connection().unwrap();
    let start = Instant::now();
    drop(db);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    drop(held);
}

#[test]
fn a_closure_may_return_diesels_own_query_result() {
    let (_dir, path) = fresh_db();
    let db = quick_busy().open(&path, MIGRATIONS).unwrap();
    // A lock on BEGIN is the layer's to retry, whatever the closure returns.
    let holder = hold_write_lock(&path, Duration::from_millis(600));
    let value: i64 = db.write(|conn| bump_in(conn, "a")).unwrap();
    holder.join().unwrap();
    assert_eq!(value, 1);
    let seen: Vec<i64> = db
        .read(|conn| {
            use common::schema::events;
            events::table.select(events::value).load(conn)
        })
        .unwrap();
    assert_eq!(seen, [1]);
    // Past the deadline, the layer's Busy comes back inside Diesel's error.
    let db = quick_busy()
        .retry(RetryPolicy::new().max_elapsed(Duration::from_millis(300)))
        .open(&path, MIGRATIONS)
        .unwrap();
    let holder = hold_write_lock(&path, Duration::from_millis(1500));
    let error = db.write(|conn| bump_in(conn, "a")).unwrap_err();
    holder.join().unwrap();
    match error {
        diesel::result::Error::QueryBuilderError(inner) => {
            let layer = inner.downcast_ref::<Error>().expect("the layer's error");
            assert!(matches!(layer, Error::Busy { .. }), "{layer}");
        }
        other => panic!("expected the boxed Busy, got {other:?}"),
    }
}

/// `PRAGMA synchronous` as a connection of `db` reports it.
fn synchronous_of(conn: &mut SqliteConnection) -> i32 {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        synchronous: i32,
    }
    diesel::sql_query("PRAGMA synchronous")
        .get_result::<Row>(conn)
        .unwrap()
        .synchronous
}

#[test]
fn every_connection_is_durable_when_asked_and_normal_under_wal_by_default() {
    use sqlite_persistence::Synchronous;
    let (_dir, path) = fresh_db();
    // The default under WAL: NORMAL (1), which a power loss can take the last commits back
    // from, as the options table says.
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    assert_eq!(synchronous_of(&mut db.connection().unwrap()), 1);
    drop(db);
    // The durable setting, FULL (2), on every connection of the pool, not just the first.
    let db = Options::new()
        .synchronous(Synchronous::Full)
        .pool_size(3)
        .open(&path, MIGRATIONS)
        .unwrap();
    let mut held: Vec<_> = (0..3).map(|_| db.connection().unwrap()).collect();
    for conn in &mut held {
        assert_eq!(synchronous_of(conn), 2);
    }
    drop(held);
    let in_write = db
        .write(|conn| -> sqlite_persistence::Result<i32> { Ok(synchronous_of(conn)) })
        .unwrap();
    assert_eq!(in_write, 2);
}
