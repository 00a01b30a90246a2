//! A handle's connections: the one its open set up serves one operation at a time, and the
//! pool (with r2d2's thread) is built only when a second connection is needed at once.

mod common;

use std::sync::{mpsc, Barrier};
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use sqlite_persistence::{Database, Error, Options};

#[cfg(target_os = "linux")]
use common::threads;
use common::{bump, fresh_db, values, MIGRATIONS};

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Child role: opens, writes once, reads, and prints its thread count before the open,
/// after the write and read, and after asking for the pool.
#[cfg(target_os = "linux")]
#[test]
#[ignore = "a child role of one_thread_starts_no_thread_until_the_pool_is_needed"]
fn pool_child() {
    let Ok(path) = std::env::var("POOL_CHILD_DB") else {
        return;
    };
    common::exit_after(60);
    let before = threads();
    let db = Database::open(&path, MIGRATIONS).unwrap();
    bump(&db, "a").unwrap();
    assert_eq!(values(&db, "a").unwrap(), [1]);
    let used = threads();
    db.pool().unwrap();
    let pooled = threads();
    println!("{before} {used} {pooled}");
}

#[cfg(target_os = "linux")]
#[test]
fn one_thread_starts_no_thread_until_the_pool_is_needed() {
    let (_dir, db) = fresh_db();
    let child = common::child_role("pool_child", &[("POOL_CHILD_DB", db.display().to_string())]);
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let counts: Vec<usize> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .find_map(|line| {
            let counts: Vec<usize> = line
                .split(' ')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            (counts.len() == 3).then_some(counts)
        })
        .expect("the child printed its thread counts");
    let [before, used, pooled] = counts[..] else {
        unreachable!()
    };
    assert_eq!(used, before, "the open, a write and a read started threads");
    // The pool's one scheduler thread (the probe before it has ended).
    assert_eq!(pooled, before + 1);
}

#[test]
fn a_second_operation_at_once_gets_a_connection_of_its_own() {
    let (_dir, path) = fresh_db();
    let db = Database::open(&path, MIGRATIONS).unwrap();
    bump(&db, "a").unwrap();
    let inside = Barrier::new(2);
    let (read_done, read_seen) = mpsc::channel();
    std::thread::scope(|s| {
        // A write that stays inside its transaction (on the open's connection) until the
        // read beside it has finished: the read must have had another connection.
        let (db, inside) = (&db, &inside);
        let writer = s.spawn(move || {
            db.write(|conn| -> sqlite_persistence::Result<()> {
                common::bump_in(conn, "a")?;
                inside.wait();
                let seen: Vec<i64> = read_seen
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the read finished while the write was open");
                // It read the last commit, not this open transaction.
                assert_eq!(seen, [1]);
                Ok(())
            })
        });
        inside.wait();
        let seen = values(db, "a").unwrap();
        read_done.send(seen).unwrap();
        writer.join().unwrap().unwrap();
    });
    assert_eq!(values(&db, "a").unwrap(), [1, 2]);
    db.close().unwrap();
}

#[test]
fn the_pool_hands_out_the_opens_connection_first() {
    let (_dir, path) = fresh_db();
    let db = Database::open(&path, MIGRATIONS).unwrap();
    // The rowid of the last insert is each connection's own (a new one says 0).
    bump(&db, "a").unwrap();
    let mut conn = db.connection().unwrap();
    let count: Count = diesel::sql_query("SELECT last_insert_rowid() AS n")
        .get_result(&mut *conn)
        .unwrap();
    assert!(count.n > 0, "the pool opened another connection");
    drop(conn);
    db.close().unwrap();
}

#[test]
fn a_panic_inside_a_write_leaves_no_transaction_behind() {
    let (_dir, path) = fresh_db();
    let db = Database::open(&path, MIGRATIONS).unwrap();
    bump(&db, "a").unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        db.write(|conn| -> sqlite_persistence::Result<()> {
            common::bump_in(conn, "a")?;
            panic!("the closure panics inside its transaction");
        })
    }));
    assert!(panicked.is_err());
    // The connection left inside its transaction was closed (rolled back), not used again.
    bump(&db, "a").unwrap();
    assert_eq!(values(&db, "a").unwrap(), [1, 2]);
    db.close().unwrap();
}

/// Child role: at a thread limit of 1, writes (no thread needed), then asks for the pool.
#[cfg(target_os = "linux")]
#[test]
#[ignore = "a child role of at_the_thread_limit_writes_go_on_and_the_pool_is_a_clean_error"]
fn thread_limit_child() {
    let Ok(path) = std::env::var("THREAD_LIMIT_CHILD_DB") else {
        return;
    };
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    bump(&db, "a").unwrap();
    match db.pool() {
        Err(error @ Error::NoThread { .. }) => println!("refused: {error}"),
        other => println!("unexpected: {other:?}"),
    }
    bump(&db, "a").unwrap();
    println!("values: {:?}", values(&db, "a").unwrap());
}

#[cfg(target_os = "linux")]
#[test]
fn at_the_thread_limit_writes_go_on_and_the_pool_is_a_clean_error() {
    use std::os::unix::process::CommandExt;
    let (dir, path) = fresh_db();
    Database::open(&path, MIGRATIONS).unwrap().close().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let mut command = if common::is_root() {
        // RLIMIT_NPROC binds only other users: the test binary (copied where they may run
        // it), the file and its directory become nobody's.
        use std::os::unix::fs::PermissionsExt;
        let exe = bin.path().join("pool-test");
        std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
        for (file, mode) in [(bin.path(), 0o755), (exe.as_path(), 0o755)] {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        for file in [dir.path(), path.as_path()] {
            std::os::unix::fs::chown(file, Some(common::NOBODY), Some(common::NOBODY)).unwrap();
        }
        let mut command = std::process::Command::new(exe);
        command
            .current_dir("/")
            .uid(common::NOBODY)
            .gid(common::NOBODY);
        command
    } else {
        std::process::Command::new(std::env::current_exe().unwrap())
    };
    command
        .args(["thread_limit_child", "--exact", "--ignored", "--nocapture"])
        // One test at a time, on the harness's main thread: at the limit it can start none.
        .args(["--test-threads", "1"])
        .env("RUST_TEST_THREADS", "1")
        .env("THREAD_LIMIT_CHILD_DB", &path);
    // SAFETY: between fork and exec, only setrlimit, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1,
                rlim_max: 1,
            };
            if libc::setrlimit(libc::RLIMIT_NPROC, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let start = std::time::Instant::now();
    let output = loop {
        // Another test may fork while the copy is open for writing (ETXTBSY until it execs).
        match command.output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                assert!(start.elapsed() < Duration::from_secs(10), "{e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            result => break result.unwrap(),
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("refused: cannot start a thread"),
        "{stdout}\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.contains("values: [1, 2]"), "{stdout}\n{stderr}");
}

/// The value of `PRAGMA name` on `conn`.
fn pragma(conn: &mut diesel::SqliteConnection, name: &str) -> String {
    #[derive(QueryableByName)]
    struct Value {
        #[diesel(sql_type = diesel::sql_types::Text)]
        value: String,
    }
    #[derive(QueryableByName)]
    struct Mode {
        #[diesel(sql_type = diesel::sql_types::Text)]
        locking_mode: String,
    }
    match name {
        // It has no table-valued function.
        "locking_mode" => {
            diesel::sql_query("PRAGMA locking_mode")
                .get_result::<Mode>(conn)
                .unwrap()
                .locking_mode
        }
        _ => {
            let column = if name == "busy_timeout" {
                "timeout"
            } else {
                name
            };
            diesel::sql_query(format!(
                "SELECT CAST({column} AS TEXT) AS value FROM pragma_{name}()"
            ))
            .get_result::<Value>(conn)
            .unwrap()
            .value
        }
    }
}

/// A pragma a closure (or the user of a connection taken from the pool) sets does not
/// outlive it: `busy_timeout = 0`, `foreign_keys = OFF` and `locking_mode = EXCLUSIVE`
/// (which locks every other process out) stayed on the pooled connection; they are put back
/// before it serves again. `query_only` and `journal_mode` are the layer's: assigning them
/// is refused (`query_only = 1` inside a `write` made every later write on that connection
/// fail, `journal_mode = DELETE` took the file out of WAL for every process). What cannot be
/// put back (a temporary table, which took the writes of later callers meant for the real
/// one, and vanished with them; `ignore_check_constraints`) has the connection closed. The
/// connection is the open's own (no pool yet) and then the pool's.
#[test]
fn settings_a_closure_assigns_do_not_outlive_it() {
    let (_dir, path) = fresh_db();
    let db = Options::new().pool_size(1).open(&path, MIGRATIONS).unwrap();
    for round in 0..2 {
        for owned in ["PRAGMA query_only = 1", "PRAGMA journal_mode = DELETE"] {
            let refused = db.write(|conn| -> sqlite_persistence::Result<()> {
                conn.batch_execute(owned)?;
                Ok(())
            });
            assert!(refused.is_err(), "{owned}");
        }
        db.write(|conn| -> sqlite_persistence::Result<()> {
            conn.batch_execute("PRAGMA busy_timeout = 0; PRAGMA locking_mode = EXCLUSIVE;")?;
            Ok(())
        })
        .unwrap();
        bump(&db, "a").unwrap();
        // (A read has query_only on: the settings are read inside a write.)
        let (timeout, query_only, locking) = db
            .write(|conn| -> sqlite_persistence::Result<_> {
                Ok((
                    pragma(conn, "busy_timeout"),
                    pragma(conn, "query_only"),
                    pragma(conn, "locking_mode"),
                ))
            })
            .unwrap();
        assert_eq!(
            (timeout.as_str(), query_only.as_str(), locking.as_str()),
            ("5000", "0", "normal"),
            "round {round}"
        );
        assert_eq!(db.journal_mode(), sqlite_persistence::JournalMode::Wal);
        // Another process (here a plain connection) may write: no exclusive lock is kept.
        let mut plain = common::plain_sqlite(&path);
        plain
            .batch_execute(&format!(
                "BEGIN IMMEDIATE; INSERT INTO counters (name) VALUES ('plain-{round}'); COMMIT;"
            ))
            .unwrap();
        drop(plain);
        // A temporary table named like the real one, and a check switched off.
        db.write(|conn| -> sqlite_persistence::Result<()> {
            conn.batch_execute(
                "CREATE TEMP TABLE counters (name TEXT, value INTEGER); \
                 PRAGMA ignore_check_constraints = ON;",
            )?;
            Ok(())
        })
        .unwrap();
        bump(&db, "a").unwrap();
        // The second round on the pool's connection.
        db.pool().unwrap();
    }
    // A connection taken from the pool and given back with its settings changed.
    {
        let mut conn = db.connection().unwrap();
        conn.batch_execute("PRAGMA foreign_keys = OFF;").unwrap();
    }
    bump(&db, "a").unwrap();
    let foreign_keys = db
        .read(|conn| -> sqlite_persistence::Result<_> { Ok(pragma(conn, "foreign_keys")) })
        .unwrap();
    assert_eq!(foreign_keys, "1");
    // Every write reached the file: none went to the temporary table.
    drop(db);
    common::wait_closed(&path);
    let db = Options::new().open(&path, MIGRATIONS).unwrap();
    assert_eq!(values(&db, "a").unwrap(), [1, 2, 3, 4, 5]);
}
