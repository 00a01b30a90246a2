//! Group commit (`Options::group_commit`): writers that arrive while another holds the write
//! transaction join it, each closure in its own savepoint, one COMMIT for all.
//!
//! Each test holds the leader's transaction open (its closure waits until the others have
//! announced themselves, then a moment longer) so that the others join its group, and proves
//! they did: `PRAGMA defer_foreign_keys`, which the leader turns on, is a setting of the
//! transaction (SQLite turns it off at COMMIT), so a closure that reads it on is in the
//! leader's transaction.
#![cfg(feature = "sqlite")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use sqlite_persistence::{Database, Error, Options, RetryPolicy, Synchronous};

use common::schema::{counters, events};
use common::MIGRATIONS;

fn grouped() -> Options {
    Options::new()
        .synchronous(Synchronous::Full)
        .group_commit(true)
}

fn open(path: &std::path::Path, options: Options) -> Database {
    options.open(path, MIGRATIONS).unwrap()
}

#[derive(QueryableByName)]
struct Deferred {
    #[diesel(sql_type = BigInt)]
    defer_foreign_keys: i64,
}

/// Whether `conn` is in a transaction whose leader turned `defer_foreign_keys` on.
fn in_leaders_transaction(conn: &mut SqliteConnection) -> bool {
    diesel::sql_query("PRAGMA defer_foreign_keys")
        .get_result::<Deferred>(conn)
        .unwrap()
        .defer_foreign_keys
        == 1
}

fn insert(conn: &mut SqliteConnection, name: &str) -> QueryResult<usize> {
    diesel::insert_into(counters::table)
        .values(counters::name.eq(name))
        .execute(conn)
}

fn names(db: &Database) -> Vec<String> {
    db.read(|conn| -> sqlite_persistence::Result<Vec<String>> {
        Ok(counters::table
            .select(counters::name)
            .order(counters::name)
            .load(conn)?)
    })
    .unwrap()
}

/// The leader's closure: turns `defer_foreign_keys` on, inserts `name`, waits until
/// `members` writers have announced themselves in `arrived` (at most 20 s), then `linger`
/// longer, so that they are waiting in its group's line.
fn lead(
    conn: &mut SqliteConnection,
    name: &str,
    arrived: &AtomicUsize,
    members: usize,
    linger: Duration,
) -> QueryResult<()> {
    conn.batch_execute("PRAGMA defer_foreign_keys = ON")?;
    insert(conn, name)?;
    let start = Instant::now();
    while arrived.load(Ordering::SeqCst) < members && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(linger);
    Ok(())
}

/// Runs `leader` on one thread and, once it began its transaction, `members` writers on
/// their own, each `member(i, db, arrived)` (which must announce itself in `arrived` right
/// before its write); returns what each member's thread returned (`Err` if it panicked).
fn group_of<L, M, R>(
    db: &Database,
    members: usize,
    leader: L,
    member: M,
) -> Vec<std::thread::Result<R>>
where
    L: FnOnce(&Database, &AtomicUsize) + Send,
    M: Fn(usize, &Database, &AtomicUsize) -> R + Sync,
    R: Send,
{
    let arrived = AtomicUsize::new(0);
    let began = Barrier::new(2);
    std::thread::scope(|s| {
        let (arrived, began, member) = (&arrived, &began, &member);
        s.spawn(move || {
            // The leader's write begins before the members are let go.
            let leader = leader;
            let db = db;
            std::thread::scope(|inner| {
                inner.spawn(|| leader(db, arrived));
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(150) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                began.wait();
            });
        });
        began.wait();
        let handles: Vec<_> = (0..members)
            .map(|i| s.spawn(move || member(i, db, arrived)))
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    })
}

#[derive(Debug)]
#[allow(dead_code)] // Read by its Debug.
enum AppError {
    Refused(usize),
    Layer(Error),
}

impl From<Error> for AppError {
    fn from(error: Error) -> Self {
        AppError::Layer(error)
    }
}

impl From<diesel::result::Error> for AppError {
    fn from(error: diesel::result::Error) -> Self {
        AppError::Layer(error.into())
    }
}

#[test]
fn a_failing_member_rolls_back_only_its_savepoint_and_gets_its_own_error() {
    let (_dir, path) = common::fresh_db();
    let db = open(&path, grouped());
    let results = group_of(
        &db,
        12,
        |db, arrived| {
            db.write(|conn| lead(conn, "leader", arrived, 12, Duration::from_millis(200)))
                .unwrap();
        },
        |i, db, arrived| {
            arrived.fetch_add(1, Ordering::SeqCst);
            db.write(|conn| -> Result<bool, AppError> {
                let shared = in_leaders_transaction(conn);
                insert(conn, &format!("m{i:02}"))?;
                if i % 3 == 0 {
                    return Err(AppError::Refused(i));
                }
                Ok(shared)
            })
        },
    );
    let mut expected = vec!["leader".to_owned()];
    for (i, result) in results.into_iter().enumerate() {
        match result.expect("no member panicked") {
            Ok(shared) => {
                assert!(shared, "member {i} ran in a transaction of its own");
                expected.push(format!("m{i:02}"));
            }
            Err(AppError::Refused(n)) => assert!(n == i && i % 3 == 0),
            Err(other) => panic!("member {i}: {other:?}"),
        }
    }
    expected.sort();
    assert_eq!(names(&db), expected);
    // The setting was the transaction's: gone after the COMMIT.
    db.write(|conn| -> sqlite_persistence::Result<()> {
        assert!(!in_leaders_transaction(conn));
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_failed_commit_answers_no_member_ok_and_commits_nothing() {
    let (_dir, path) = common::fresh_db();
    let db = open(&path, grouped());
    let leader_result = std::sync::Mutex::new(None);
    let results = group_of(
        &db,
        8,
        |db, arrived| {
            let result =
                db.write(|conn| lead(conn, "leader", arrived, 8, Duration::from_millis(200)));
            *leader_result.lock().unwrap() = Some(result);
        },
        |i, db, arrived| {
            arrived.fetch_add(1, Ordering::SeqCst);
            db.write(|conn| -> sqlite_persistence::Result<bool> {
                let shared = in_leaders_transaction(conn);
                insert(conn, &format!("m{i}"))?;
                if i == 5 {
                    // A dangling reference: foreign keys are deferred, so the COMMIT fails.
                    diesel::insert_into(events::table)
                        .values((events::counter.eq("nobody"), events::value.eq(1)))
                        .execute(conn)?;
                }
                Ok(shared)
            })
        },
    );
    for (i, result) in results.into_iter().enumerate() {
        let error = result
            .expect("no member panicked")
            .expect_err("answered Ok though the COMMIT failed");
        assert!(
            common::chain(&error).contains("FOREIGN KEY"),
            "member {i}: {}",
            common::chain(&error)
        );
    }
    let leader = leader_result.into_inner().unwrap().unwrap();
    assert!(leader.is_err(), "the leader was answered Ok: {leader:?}");
    assert!(names(&db).is_empty(), "{:?}", names(&db));
    // The handle writes on.
    db.write(|conn| -> sqlite_persistence::Result<usize> { Ok(insert(conn, "after")?) })
        .unwrap();
    assert_eq!(names(&db), ["after"]);
}

#[test]
fn a_nested_write_in_a_grouped_closure_is_refused_as_reentrant() {
    let (_dir, path) = common::fresh_db();
    let db = open(&path, grouped());
    let other = open(&path, grouped());
    let results = group_of(
        &db,
        4,
        |db, arrived| {
            db.write(|conn| -> sqlite_persistence::Result<()> {
                lead(conn, "leader", arrived, 4, Duration::from_millis(150))?;
                let nested = db.write(|_| -> sqlite_persistence::Result<()> { Ok(()) });
                assert!(matches!(nested, Err(Error::Reentrant { .. })), "{nested:?}");
                Ok(())
            })
            .unwrap();
        },
        |i, db, arrived| {
            arrived.fetch_add(1, Ordering::SeqCst);
            db.write(|conn| -> sqlite_persistence::Result<(bool, bool, bool)> {
                let shared = in_leaders_transaction(conn);
                insert(conn, &format!("m{i}"))?;
                let same = db.write(|_| -> sqlite_persistence::Result<()> { Ok(()) });
                // Another handle of the same file would wait for the lock this group holds.
                let other = other.write(|_| -> sqlite_persistence::Result<()> { Ok(()) });
                Ok((
                    shared,
                    matches!(same, Err(Error::Reentrant { .. })),
                    matches!(other, Err(Error::Reentrant { .. })),
                ))
            })
        },
    );
    for (i, result) in results.into_iter().enumerate() {
        let (shared, same, other) = result.unwrap().unwrap();
        assert!(
            shared && same && other,
            "member {i}: {shared} {same} {other}"
        );
    }
    assert_eq!(names(&db), ["leader", "m0", "m1", "m2", "m3"]);
}

#[test]
fn a_member_still_waiting_at_its_deadline_gets_busy_in_time() {
    let (_dir, path) = common::fresh_db();
    let deadline = Duration::from_millis(400);
    let db = open(
        &path,
        grouped().retry(RetryPolicy::new().max_elapsed(deadline)),
    );
    let results = group_of(
        &db,
        6,
        |db, arrived| {
            // Holds the transaction 1.5 s, far past the members' deadline.
            db.write(|conn| lead(conn, "leader", arrived, 6, Duration::from_millis(1500)))
                .unwrap();
        },
        |i, db, arrived| {
            arrived.fetch_add(1, Ordering::SeqCst);
            let start = Instant::now();
            let captured = common::Captured::default();
            let result = tracing::subscriber::with_default(
                captured.subscriber(tracing::Level::WARN),
                || {
                    db.write(|conn| -> sqlite_persistence::Result<usize> {
                        Ok(insert(conn, &format!("m{i}"))?)
                    })
                },
            );
            (result, start.elapsed(), captured.text())
        },
    );
    for (i, result) in results.into_iter().enumerate() {
        let (result, took, events) = result.unwrap();
        // The giving-up event of a single write, on the member's thread.
        assert!(
            events.contains("database stayed locked, giving up")
                && events.contains("ERROR")
                && events.contains("operation=\"write\""),
            "member {i}: {events}"
        );
        match result {
            Err(Error::Busy { operation, .. }) => {
                assert_eq!(operation, sqlite_persistence::Operation::Write)
            }
            other => panic!("member {i}: {other:?}"),
        }
        assert!(
            took < Duration::from_millis(1300),
            "member {i} answered after {took:?}, its deadline was {deadline:?}"
        );
    }
    assert_eq!(names(&db), ["leader"]);
}

#[test]
fn a_panicking_member_takes_only_itself_down_and_its_panic_reaches_its_caller() {
    let (_dir, path) = common::fresh_db();
    let db = open(&path, grouped());
    let results = group_of(
        &db,
        6,
        |db, arrived| {
            db.write(|conn| lead(conn, "leader", arrived, 6, Duration::from_millis(200)))
                .unwrap();
        },
        |i, db, arrived| {
            arrived.fetch_add(1, Ordering::SeqCst);
            db.write(|conn| -> sqlite_persistence::Result<bool> {
                let shared = in_leaders_transaction(conn);
                insert(conn, &format!("m{i}"))?;
                if i == 2 {
                    panic!("member 2 panics");
                }
                if i == 4 {
                    // A panic inside a transaction of its own, nested in its savepoint.
                    let _ = conn.transaction(|conn| -> QueryResult<()> {
                        insert(conn, "m4-nested")?;
                        panic!("member 4 panics inside a nested transaction")
                    });
                }
                Ok(shared)
            })
        },
    );
    let mut expected = vec!["leader".to_owned()];
    for (i, result) in results.into_iter().enumerate() {
        match (i, result) {
            (2 | 4, Err(panic)) => {
                let message = panic.downcast_ref::<&str>().copied().unwrap_or_default();
                assert!(
                    message.starts_with(&format!("member {i} panics")),
                    "{message}"
                );
            }
            (_, Ok(Ok(shared))) => {
                assert!(shared, "member {i}");
                expected.push(format!("m{i}"));
            }
            (_, Ok(Err(error))) => panic!("member {i}: {}", common::chain(&error)),
            (_, Err(_)) => panic!("member {i} panicked"),
        }
    }
    expected.sort();
    assert_eq!(names(&db), expected);
    // Nothing is poisoned: the handle writes on, alone and in groups.
    let results = group_of(
        &db,
        3,
        |db, arrived| {
            db.write(|conn| lead(conn, "again", arrived, 3, Duration::from_millis(100)))
                .unwrap();
        },
        |i, db, arrived| {
            arrived.fetch_add(1, Ordering::SeqCst);
            db.write(|conn| -> sqlite_persistence::Result<usize> {
                Ok(insert(conn, &format!("again{i}"))?)
            })
        },
    );
    assert!(results.into_iter().all(|r| matches!(r, Ok(Ok(1)))));
}

#[test]
fn a_panicking_leader_hands_the_group_over_to_a_member() {
    let (_dir, path) = common::fresh_db();
    let db = open(&path, grouped());
    let results = group_of(
        &db,
        5,
        |db, arrived| {
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                db.write(|conn| -> QueryResult<()> {
                    lead(conn, "leader", arrived, 5, Duration::from_millis(150))?;
                    panic!("the leader panics")
                })
            }));
            assert!(panicked.is_err());
        },
        |i, db, arrived| {
            arrived.fetch_add(1, Ordering::SeqCst);
            db.write(|conn| -> sqlite_persistence::Result<usize> {
                Ok(insert(conn, &format!("m{i}"))?)
            })
        },
    );
    assert!(results.into_iter().all(|r| matches!(r, Ok(Ok(1)))));
    assert_eq!(names(&db), ["m0", "m1", "m2", "m3", "m4"]);
}

#[test]
fn write_measured_counts_a_members_wait_and_attempts() {
    let (_dir, path) = common::fresh_db();
    let db = open(&path, grouped());
    let results = group_of(
        &db,
        3,
        |db, arrived| {
            db.write(|conn| lead(conn, "leader", arrived, 3, Duration::from_millis(200)))
                .unwrap();
        },
        |i, db, arrived| {
            arrived.fetch_add(1, Ordering::SeqCst);
            db.write_measured(|conn| -> sqlite_persistence::Result<usize> {
                Ok(insert(conn, &format!("m{i}"))?)
            })
        },
    );
    for result in results {
        let (_, stats) = result.unwrap().unwrap();
        assert_eq!(stats.attempts, 1);
        // It waited for the leader's closure (at least its 200 ms linger).
        assert!(stats.wait >= Duration::from_millis(150), "{stats:?}");
    }
}

#[test]
fn a_member_whose_closure_meets_a_lock_runs_again_after_a_pause() {
    let (dir, path) = common::fresh_db();
    let db = open(&path, grouped());
    // A second file, whose write lock another connection holds for a while: a member's
    // closure that writes there fails with "database is locked" at once.
    let other_path = dir.path().join("other.db");
    let other = open(
        &other_path,
        Options::new().busy_timeout(Duration::from_millis(5)),
    );
    let held = common::hold_lock_until_released(&other_path, "BEGIN IMMEDIATE");
    let release = std::sync::Mutex::new(Some(held));
    let results = group_of(
        &db,
        3,
        |db, arrived| {
            db.write(|conn| lead(conn, "leader", arrived, 3, Duration::from_millis(150)))
                .unwrap();
            // The members' first runs met the lock; let it go a moment later.
            std::thread::sleep(Duration::from_millis(100));
            release.lock().unwrap().take().unwrap().release();
        },
        |i, db, arrived| {
            arrived.fetch_add(1, Ordering::SeqCst);
            let captured = common::Captured::default();
            let result = tracing::subscriber::with_default(
                captured.subscriber(tracing::Level::WARN),
                || {
                    db.write_measured(|conn| -> sqlite_persistence::Result<usize> {
                        // Inserted again at each run: had a failed run's savepoint been
                        // kept, the name would be taken.
                        insert(conn, &format!("m{i}"))?;
                        let mut elsewhere = other.connection()?;
                        Ok(insert(&mut elsewhere, &format!("m{i}"))?)
                    })
                },
            );
            (result, captured.text())
        },
    );
    for (i, result) in results.into_iter().enumerate() {
        let (result, events) = result.unwrap();
        let (inserted, stats) = result.unwrap();
        assert!(
            events.contains("database is locked, retrying"),
            "member {i}: {events}"
        );
        assert_eq!(inserted, 1);
        assert!(stats.attempts >= 2, "member {i}: {stats:?}");
    }
    assert_eq!(names(&db), ["leader", "m0", "m1", "m2"]);
    assert_eq!(names(&other), ["m0", "m1", "m2"]);
}

/// A COMMIT that meets a lock runs the whole group again: under a rollback journal the
/// COMMIT needs every reader gone, and a reader holds on for a while.
#[test]
fn a_commit_that_meets_a_lock_runs_every_members_closure_again() {
    let (_dir, path) = common::fresh_db();
    let db = open(
        &path,
        grouped()
            .journal_mode(sqlite_persistence::JournalMode::Delete)
            .busy_timeout(Duration::from_millis(20)),
    );
    let reader = common::hold_lock_until_released(&path, "BEGIN; SELECT count(*) FROM counters;");
    let release = std::sync::Mutex::new(Some(reader));
    let results = group_of(
        &db,
        4,
        |db, arrived| {
            std::thread::scope(|s| {
                s.spawn(|| {
                    std::thread::sleep(Duration::from_millis(700));
                    release.lock().unwrap().take().unwrap().release();
                });
                let (_, stats) = db
                    .write_measured(|conn| {
                        lead(conn, "leader", arrived, 4, Duration::from_millis(100))
                    })
                    .unwrap();
                assert!(stats.attempts >= 2, "the leader: {stats:?}");
            });
        },
        |i, db, arrived| {
            arrived.fetch_add(1, Ordering::SeqCst);
            db.write_measured(|conn| -> sqlite_persistence::Result<bool> {
                let shared = in_leaders_transaction(conn);
                insert(conn, &format!("m{i}"))?;
                Ok(shared)
            })
        },
    );
    for (i, result) in results.into_iter().enumerate() {
        let (shared, stats) = result.unwrap().unwrap();
        assert!(shared, "member {i}");
        assert!(stats.attempts >= 2, "member {i}: {stats:?}");
    }
    assert_eq!(names(&db), ["leader", "m0", "m1", "m2", "m3"]);
}

#[cfg(feature = "tokio")]
#[test]
fn tasks_of_an_async_handle_with_group_commit_write_every_value_once() {
    use sqlite_persistence::AsyncDatabase;
    const TASKS: usize = 16;
    const EACH: usize = 20;
    let (_dir, path) = common::fresh_db();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (values, shared) = runtime.block_on(async {
        let db = AsyncDatabase::open_with(grouped(), &path, MIGRATIONS)
            .await
            .unwrap();
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let db = db.clone();
                tokio::spawn(async move {
                    let mut values = Vec::new();
                    let mut shared = 0;
                    for _ in 0..EACH {
                        let (value, member) = db
                            .write(|conn| -> sqlite_persistence::Result<(i64, bool)> {
                                let member = in_a_members_savepoint(conn);
                                Ok((common::bump_in(conn, "a")?, member))
                            })
                            .await
                            .unwrap();
                        values.push(value);
                        shared += usize::from(member);
                    }
                    (values, shared)
                })
            })
            .collect();
        let mut values = Vec::new();
        let mut shared = 0;
        for task in tasks {
            let (v, s) = task.await.unwrap();
            values.extend(v);
            shared += s;
        }
        (values, shared)
    });
    let mut values = values;
    values.sort_unstable();
    assert_eq!(values, (1..=(TASKS * EACH) as i64).collect::<Vec<_>>());
    // `AsyncDatabase` runs a SQLite handle's writes one after another (src/tokio.rs), so
    // today its tasks never meet in a group: correct, and no faster.
    eprintln!(
        "{shared} of {} writes ran in another's transaction",
        TASKS * EACH
    );
    let db = open(&path, grouped());
    assert_eq!(
        common::values(&db, "a").unwrap(),
        (1..=(TASKS * EACH) as i64).collect::<Vec<_>>()
    );
}

// Several processes, each with 16 threads writing through group commit: every write
// acknowledged is there exactly once.

const PROCESSES: usize = 3;
const THREADS: usize = 16;
const WRITES: usize = 25;

#[test]
fn across_processes_every_acknowledged_grouped_write_is_there_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    open(&path, grouped()).close().unwrap();
    let barrier = dir.path().join("go");
    let env = [
        ("SP_GROUP_DB", path.display().to_string()),
        ("SP_GROUP_BARRIER", barrier.display().to_string()),
    ];
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| common::child_role("group_commit_child", &env))
        .collect();
    let ready = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with("ready-")
            })
            .count()
    };
    let start = Instant::now();
    while ready() < PROCESSES {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {} of {PROCESSES} children reached the barrier",
            ready()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(&barrier, "").unwrap();
    let mut acked: Vec<(String, i64)> = Vec::new();
    let mut grouped_writes = 0usize;
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a child failed: {:?}", out.status);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut done = false;
        for line in text.lines() {
            if let Some(ack) = line.strip_prefix("ack ") {
                let (counter, value) = ack.split_once(' ').unwrap();
                acked.push((counter.to_owned(), value.parse().unwrap()));
            } else if let Some(shared) = line.strip_prefix("done shared=") {
                grouped_writes += shared.parse::<usize>().unwrap();
                done = true;
            }
        }
        assert!(done, "a child did not finish: {text}");
    }
    assert_eq!(acked.len(), PROCESSES * THREADS * WRITES);
    let db = open(&path, grouped());
    let mut present: Vec<(String, i64)> = db
        .read(|conn| -> sqlite_persistence::Result<_> {
            Ok(events::table
                .select((events::counter, events::value))
                .load(conn)?)
        })
        .unwrap();
    acked.sort();
    present.sort();
    // Every acknowledged write once, and nothing else (events are unique by construction
    // of the key; the counters say no write was counted twice).
    assert_eq!(present, acked);
    let counters: Vec<(String, i64)> = db
        .read(|conn| -> sqlite_persistence::Result<_> {
            Ok(counters::table
                .select((counters::name, counters::value))
                .load(conn)?)
        })
        .unwrap();
    assert_eq!(counters.len(), PROCESSES);
    for (name, value) in counters {
        assert_eq!(value as usize, THREADS * WRITES, "counter {name}");
    }
    // Groups did form (a write that found the transaction of another in its process).
    assert!(grouped_writes > 0, "no write ran in another's transaction");
}

/// A child of the cross-process test: 16 threads each count this process's counter up
/// `WRITES` times through group commit, printing each value acknowledged.
#[test]
#[ignore = "a child role of across_processes_every_acknowledged_grouped_write_is_there_exactly_once"]
fn group_commit_child() {
    let Ok(path) = std::env::var("SP_GROUP_DB") else {
        return;
    };
    common::exit_after(120);
    let barrier = std::path::PathBuf::from(std::env::var("SP_GROUP_BARRIER").unwrap());
    let dir = barrier.parent().unwrap();
    let db = open(std::path::Path::new(&path), grouped());
    std::fs::write(dir.join(format!("ready-{}", std::process::id())), "").unwrap();
    while !barrier.exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let counter = format!("p{}", std::process::id());
    let shared = AtomicUsize::new(0);
    let lines = std::sync::Mutex::new(String::new());
    let go = Arc::new(Barrier::new(THREADS));
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            let (db, counter, shared, lines, go) = (&db, &counter, &shared, &lines, go.clone());
            s.spawn(move || {
                go.wait();
                for _ in 0..WRITES {
                    let value = db
                        .write(|conn| -> sqlite_persistence::Result<i64> {
                            if in_a_members_savepoint(conn) {
                                shared.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(common::bump_in(conn, counter)?)
                        })
                        .unwrap();
                    lines
                        .lock()
                        .unwrap()
                        .push_str(&format!("ack {counter} {value}\n"));
                }
            });
        }
    });
    print!("{}", lines.into_inner().unwrap());
    println!("done shared={}", shared.load(Ordering::Relaxed));
}

/// Whether this closure (before it changed anything) runs as a member of another writer's
/// group: there it runs in the savepoint `sqlite_persistence_member`, and rolling back to it
/// (which keeps it) changes nothing; elsewhere there is no such savepoint.
fn in_a_members_savepoint(conn: &mut SqliteConnection) -> bool {
    conn.batch_execute("ROLLBACK TO SAVEPOINT sqlite_persistence_member")
        .is_ok()
}
