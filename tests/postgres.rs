//! PostgreSQL alone, in one process, against a real server (see `common::pg`): opening and
//! its refusals, lost sessions, lock waits, the write queue. The cross-process suite, run
//! on both engines, is `tests/engines.rs`.

mod common;

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_migrations::MigrationHarness;
use sqlite_persistence::{Error, Options, PgDatabase, RetryPolicy};

use common::pg;
use common::pg::within;

/// The library's test schema (`migrations/`), which runs on both engines.
use common::MIGRATIONS;

#[derive(QueryableByName, Debug)]
struct Value {
    #[diesel(sql_type = BigInt)]
    value: i64,
}

#[derive(QueryableByName, Debug)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

fn strings(conn: &mut PgConnection, sql: &str) -> Vec<String> {
    diesel::sql_query(sql)
        .load::<Name>(conn)
        .unwrap()
        .into_iter()
        .map(|row| row.name)
        .collect()
}

fn number(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<Value>(conn)
        .unwrap()
        .value
}

/// A foreign session on `url` holding the row of counter `name` (`FOR UPDATE`) until it
/// ends its transaction.
fn foreign_row_lock(url: &str, name: &str) -> PgConnection {
    let mut foreign = pg::connect(url);
    foreign
        .batch_execute(&format!(
            "BEGIN; SELECT * FROM counters WHERE name = '{name}' FOR UPDATE"
        ))
        .unwrap();
    foreign
}

/// Read-then-write on counter `name` (and its event): the lost update that plain `READ
/// COMMITTED` lets through, and that `SERIALIZABLE` turns into a retried conflict.
use common::bump_in_pg as increment;

#[test]
fn open_migrates_once_writes_and_reads() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let db = PgDatabase::open(&url, MIGRATIONS).unwrap();
    assert_eq!(db.applied_at_open().len(), 2);
    let value = db
        .write(|conn| increment(conn, "a").map_err(Error::from))
        .unwrap();
    assert_eq!(value, 1);
    let read = db
        .read(|conn| -> sqlite_persistence::Result<i64> {
            Ok(number(conn, "SELECT value FROM counters WHERE name = 'a'"))
        })
        .unwrap();
    assert_eq!(read, 1);
    // A write inside a read is refused by the server.
    let error = db
        .read(|conn| increment(conn, "b").map_err(Error::from))
        .unwrap_err();
    assert!(common::chain(&error).contains("read-only"), "{error}");

    let again = PgDatabase::open(&url, MIGRATIONS).unwrap();
    assert!(again.applied_at_open().is_empty());
    let mut conn = pg::connect(&url);
    assert_eq!(
        strings(
            &mut conn,
            "SELECT version AS name FROM __diesel_schema_migrations ORDER BY 1"
        ),
        common::VERSIONS
    );
    assert_eq!(
        number(
            &mut conn,
            "SELECT count(*) AS value FROM __sqlite_persistence_checksums"
        ),
        2
    );
    // The URL in errors and events has no password.
    assert!(!db.url().contains("secret"));
    // Its sessions carry this program's name, as pg_stat_activity (and the holders an error
    // names) show them.
    let held = db.connection().unwrap();
    let program = std::env::current_exe()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let names = strings(
        &mut conn,
        "SELECT application_name::text AS name FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    );
    assert!(
        !names.is_empty() && names.iter().all(|n| *n == program),
        "{names:?}"
    );
    drop(held);
}

#[test]
fn a_foreign_schema_ahead_or_edited_database_is_refused_before_anything_is_written() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    Options::new()
        .application_id(common::APPLICATION_ID)
        .open_postgres(&url, MIGRATIONS)
        .unwrap();
    let error = Options::new()
        .application_id(7)
        .open_postgres(&url, MIGRATIONS)
        .unwrap_err();
    assert!(
        matches!(error, Error::ForeignDatabase { found, .. } if found == common::APPLICATION_ID),
        "{error}"
    );

    // A newer binary applied a migration this one does not know.
    let mut conn = pg::connect(&url);
    conn.batch_execute(
        "INSERT INTO __diesel_schema_migrations (version) VALUES ('20991231000000')",
    )
    .unwrap();
    let error = PgDatabase::open(&url, MIGRATIONS).unwrap_err();
    assert!(matches!(error, Error::UnknownMigrations { .. }), "{error}");
    conn.batch_execute("DELETE FROM __diesel_schema_migrations WHERE version = '20991231000000'")
        .unwrap();

    // An applied migration's SQL changed.
    conn.batch_execute(
        "UPDATE __sqlite_persistence_checksums SET checksum = 'fnv1a64:0000000000000000' \
         WHERE version = '20261201000001'",
    )
    .unwrap();
    let error = PgDatabase::open(&url, MIGRATIONS).unwrap_err();
    assert!(matches!(error, Error::EditedMigrations { .. }), "{error}");

    // Another program's tables, no history.
    let Some(other) = pg::fresh_database() else {
        return;
    };
    pg::connect(&other)
        .batch_execute("CREATE TABLE invoices (id INT)")
        .unwrap();
    let error = PgDatabase::open(&other, MIGRATIONS).unwrap_err();
    assert!(matches!(error, Error::UnmanagedDatabase { .. }), "{error}");
    assert_eq!(
        strings(
            &mut pg::connect(&other),
            "SELECT tablename::text AS name FROM pg_tables WHERE schemaname = 'public'"
        ),
        ["invoices"]
    );
}

#[test]
fn a_url_of_another_engine_is_refused_naming_the_scheme() {
    let error = Options::new()
        .open_postgres("mysql://app:secret@db/app", MIGRATIONS)
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("mysql://") && !text.contains("secret"),
        "{text}"
    );
    let error = Options::new()
        .open_postgres("/tmp/app.db", MIGRATIONS)
        .unwrap_err();
    assert!(matches!(error, Error::UnsupportedUrl { .. }), "{error}");
}

#[test]
fn conflicting_threads_take_turns_and_leave_no_turn_held() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let db = std::sync::Arc::new(PgDatabase::open(&url, MIGRATIONS).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || {
                (0..25)
                    .map(|_| {
                        db.write_measured(|conn| -> sqlite_persistence::Result<i64> {
                            let value = increment(conn, "hot")?;
                            // Held long enough for the others to conflict.
                            std::thread::sleep(Duration::from_millis(2));
                            Ok(value)
                        })
                        .unwrap()
                        .1
                        .attempts
                    })
                    .sum::<u32>()
            })
        })
        .collect();
    let attempts: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(
        number(
            &mut pg::connect(&url),
            "SELECT value FROM counters WHERE name = 'hot'"
        ),
        100
    );
    assert!(attempts > 100, "no conflict happened: {attempts}");
    // The handle is open, its sessions idle in the pool: none holds an advisory lock.
    assert_eq!(
        number(
            &mut pg::connect(&url),
            "SELECT count(*) AS value FROM pg_locks WHERE locktype = 'advisory' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        0
    );
}

/// The write queue's key on the database of `url`: the layer's default first half, and the
/// database name's FNV-1a hash plus one (the migration lock's is the hash itself).
fn queue_key(url: &str) -> (i32, i32) {
    let name = url.split('?').next().unwrap().rsplit('/').next().unwrap();
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    }) as i32;
    (0x5351_4c50, hash.wrapping_add(1))
}

#[test]
fn a_newcomer_shares_an_idle_write_queue_and_waits_behind_a_queued_writer() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let (a, b) = queue_key(&url);
    let db = std::sync::Arc::new(
        Options::new()
            .retry(RetryPolicy::new().max_elapsed(Duration::from_secs(60)))
            .open_postgres(&url, MIGRATIONS)
            .unwrap(),
    );
    // A writer under way that does not queue holds the turn shared: a write of this handle,
    // which never met a conflict, runs beside it.
    let mut beside = pg::connect(&url);
    beside
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock_shared({a}, {b})"
        ))
        .unwrap();
    let quick = within(Duration::from_secs(30), {
        let db = db.clone();
        move || db.write(|conn| increment(conn, "a").map_err(Error::from))
    });
    assert_eq!(quick.unwrap(), 1);
    beside.batch_execute("ROLLBACK").unwrap();
    // A writer holds the turn (one that met a conflict): a newcomer waits for it instead of
    // slipping in (it ran at once, and could take the hot row from the next holder).
    let mut holder = pg::connect(&url);
    holder
        .batch_execute(&format!("SELECT pg_advisory_lock({a}, {b})"))
        .unwrap();
    let newcomer = {
        let db = db.clone();
        std::thread::spawn(move || db.write(|conn| increment(conn, "a").map_err(Error::from)))
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(!newcomer.is_finished(), "{:?}", newcomer.join());
    holder
        .batch_execute(&format!("SELECT pg_advisory_unlock({a}, {b})"))
        .unwrap();
    let written = within(Duration::from_secs(30), move || newcomer.join().unwrap());
    assert_eq!(written.unwrap(), 2);
    // Its COMMIT handed the turn over: no advisory lock is left on the database.
    assert_eq!(
        number(
            &mut holder,
            "SELECT count(*) AS value FROM pg_locks WHERE locktype = 'advisory' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        0
    );
}

#[test]
fn a_connection_lost_before_commit_is_retried_on_a_fresh_session() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let db = Options::new()
        .pool_size(1)
        .open_postgres(&url, MIGRATIONS)
        .unwrap();
    let mut runs = 0;
    let value = db
        .write(|conn| -> sqlite_persistence::Result<i64> {
            runs += 1;
            let value = increment(conn, "a")?;
            if runs == 1 {
                // The server ends this session in the middle of the transaction.
                conn.batch_execute("SELECT pg_terminate_backend(pg_backend_pid())")?;
            }
            Ok(value)
        })
        .unwrap();
    assert_eq!((value, runs), (1, 2));
    // The pool's one slot holds a working session again.
    db.write(|conn| increment(conn, "a").map_err(Error::from))
        .unwrap();
}

#[test]
fn a_row_lock_held_past_the_deadline_is_a_typed_error_naming_the_wait() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let db = Options::new()
        .lock_timeout(Duration::from_millis(300))
        .retry(RetryPolicy::new().max_elapsed(Duration::from_millis(1500)))
        .open_postgres(&url, MIGRATIONS)
        .unwrap();
    db.write(|conn| increment(conn, "a").map_err(Error::from))
        .unwrap();
    let mut foreign = foreign_row_lock(&url, "a");
    let start = Instant::now();
    let error = db
        .write(|conn| increment(conn, "a").map_err(Error::from))
        .unwrap_err();
    let waited = start.elapsed();
    let Error::Busy {
        attempts,
        elapsed,
        holders,
        ..
    } = &error
    else {
        panic!("{error:?}");
    };
    // The foreign session is named: its server process, in a write transaction.
    let foreign_pid = number(&mut foreign, "SELECT pg_backend_pid()::bigint AS value");
    assert!(
        holders.iter().any(|h| i64::from(h.pid) == foreign_pid
            && h.lock == sqlite_persistence::HeldLock::ServerTransaction),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains(&format!("server process {foreign_pid}")),
        "{error}"
    );
    // Only others: the writer's own session, which held the write queue's turn from its
    // second attempt on, is not named (it was, as "holding the write queue").
    assert!(
        holders.iter().all(|h| i64::from(h.pid) == foreign_pid),
        "{error}"
    );
    assert!(holders.iter().all(|h| !h.hidden), "{error}");
    assert!(*attempts >= 2, "{error}");
    assert!(*elapsed >= Duration::from_millis(1400), "{error}");
    // Not far past the deadline (a loaded machine may add a little).
    assert!(waited < Duration::from_secs(15), "{waited:?}");
    let text = common::chain(&error);
    assert!(text.contains("lock timeout"), "{text}");
    foreign.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn a_holder_of_another_role_is_named_as_one_this_role_cannot_see() {
    let Some(admin_url) = pg::fresh_database() else {
        return;
    };
    let role = format!("app_{}", std::process::id());
    pg::connect(&admin_url)
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
             GRANT ALL ON SCHEMA public TO {role};"
        ))
        .unwrap();
    let url = admin_url.replace("user=postgres", &format!("user={role}"));
    let db = Options::new()
        .lock_timeout(Duration::from_millis(300))
        .retry(RetryPolicy::new().max_elapsed(Duration::from_millis(1500)))
        .open_postgres(&url, MIGRATIONS)
        .unwrap();
    db.write(|conn| increment(conn, "a").map_err(Error::from))
        .unwrap();
    // The superuser's session holds the row: this role sees its pid and name, not its
    // transaction (it named only its own session then).
    let mut foreign = foreign_row_lock(&admin_url, "a");
    let foreign_pid = number(&mut foreign, "SELECT pg_backend_pid()::bigint AS value");
    let error = db
        .write(|conn| increment(conn, "a").map_err(Error::from))
        .unwrap_err();
    let Error::Busy { holders, .. } = &error else {
        panic!("{error:?}");
    };
    assert!(
        holders
            .iter()
            .any(|h| i64::from(h.pid) == foreign_pid && h.hidden),
        "{error}"
    );
    assert!(
        holders.iter().all(|h| i64::from(h.pid) == foreign_pid),
        "{error}"
    );
    assert!(error.to_string().contains("cannot see"), "{error}");
    foreign.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn plain_diesel_waits_for_a_row_lock_without_end() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let mut conn = pg::connect(&url);
    conn.run_pending_migrations(MIGRATIONS).unwrap();
    increment(&mut conn, "a").unwrap();
    let mut foreign = foreign_row_lock(&url, "a");
    let (done, finished) = std::sync::mpsc::channel();
    let plain = std::thread::spawn(move || {
        let result = conn.transaction(|conn| increment(conn, "a"));
        done.send(()).unwrap();
        result
    });
    // Still waiting after twice the layer's deadline in the test above.
    assert!(finished.recv_timeout(Duration::from_secs(3)).is_err());
    foreign.batch_execute("ROLLBACK").unwrap();
    finished.recv_timeout(Duration::from_secs(10)).unwrap();
    plain.join().unwrap().unwrap();
}

#[test]
fn a_migration_that_ends_the_transaction_is_refused_before_anything_runs() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (name, up) in [
        ("2026-12-01-000001_first", "CREATE TABLE first_table (x INT);"),
        (
            "2026-12-01-000002_commits",
            "CREATE TABLE second_table (x INT);\n-- a stray COMMIT would commit the batch so far\nCOMMIT;\nCREATE TABLE third_table (x INT);",
        ),
    ] {
        let m = dir.path().join(name);
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("up.sql"), up).unwrap();
        std::fs::write(m.join("down.sql"), "SELECT 1;").unwrap();
    }
    let source = diesel_migrations::FileBasedMigrations::from_path(dir.path()).unwrap();
    let error = PgDatabase::open(&url, source).unwrap_err();
    assert!(
        matches!(&error, Error::TransactionControl { name } if name.ends_with("_commits")),
        "{error:?}"
    );
    assert!(error.hint().is_some());
    // Nothing ran: not the first migration, not the bookkeeping.
    assert!(strings(
        &mut pg::connect(&url),
        "SELECT tablename::text AS name FROM pg_tables WHERE schemaname = 'public'"
    )
    .is_empty());
}

#[test]
fn a_deadlock_between_two_writes_is_retried_and_both_commit() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let db = std::sync::Arc::new(PgDatabase::open(&url, MIGRATIONS).unwrap());
    pg::connect(&url)
        .batch_execute("INSERT INTO counters (name) VALUES ('a'), ('b')")
        .unwrap();
    // Each write locks one row, waits for the other to lock the other row, then wants it.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let captured = common::Captured::default();
    let writers: Vec<_> = [("a", "b"), ("b", "a")]
        .into_iter()
        .map(|(first, second)| {
            let (db, barrier, captured) = (db.clone(), barrier.clone(), captured.clone());
            std::thread::spawn(move || {
                let _events =
                    tracing::subscriber::set_default(captured.subscriber(tracing::Level::WARN));
                let mut runs = 0;
                let (_, stats) = db
                    .write_measured(|conn| -> sqlite_persistence::Result<()> {
                        runs += 1;
                        let bump = "UPDATE counters SET value = value + 1 WHERE name = ";
                        conn.batch_execute(&format!("{bump}'{first}'"))?;
                        if runs == 1 {
                            barrier.wait();
                        }
                        conn.batch_execute(&format!("{bump}'{second}'"))?;
                        Ok(())
                    })
                    .unwrap();
                stats.attempts
            })
        })
        .collect();
    let attempts: Vec<u32> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    // One of them was chosen as the deadlock's victim (or met a serialization failure) and
    // ran again.
    assert!(attempts.iter().any(|&a| a > 1), "{attempts:?}");
    // The retry event says why.
    let events = captured.text();
    assert!(events.contains("deadlock: deadlock detected"), "{events}");
    // Said as what it is: no lock stayed held (it said "database is locked, retrying").
    assert!(
        events.contains("transaction conflicted, retrying"),
        "{events}"
    );
    assert!(!events.contains("database is locked"), "{events}");
    assert_eq!(
        number(
            &mut pg::connect(&url),
            "SELECT sum(value)::bigint AS value FROM counters"
        ),
        4
    );
}

/// A database whose sessions get German messages (`lc_messages` set for the database by a
/// superuser), and a role, its owner, that may not change `lc_messages` (a superuser
/// setting): returns that role's URL, or `None` where the server has no German locale (then
/// the test fails under `PG_TESTS_REQUIRED`, whose `.ci/run` makes the locale).
fn german_database_for_a_plain_role(url: &str) -> Option<String> {
    let mut admin = pg::connect(url);
    if let Err(e) = admin.batch_execute("SET lc_messages = 'de_DE.UTF-8'") {
        let why = format!(
            "no German locale on this machine ({e}); make it with `localedef -i de_DE -f \
             UTF-8 de_DE.UTF-8` and restart the server"
        );
        if std::env::var(pg::PG_TESTS_REQUIRED).as_deref() == Ok("1") {
            panic!("{why}");
        }
        eprintln!("skipped: {why}");
        return None;
    }
    let database = strings(&mut admin, "SELECT current_database()::text AS name").remove(0);
    let role = format!("{database}_app");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; ALTER DATABASE {database} OWNER TO {role}; \
             ALTER DATABASE {database} SET lc_messages = 'de_DE.UTF-8';"
        ))
        .unwrap();
    assert!(url.contains("user=postgres"), "{url}");
    Some(url.replace("user=postgres", &format!("user={role}")))
}

#[test]
fn a_lock_timeout_in_german_is_retried_and_a_role_that_may_not_set_lc_messages_writes() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let Some(role_url) = german_database_for_a_plain_role(&url) else {
        return;
    };
    // The setup is what it claims: the role's sessions get German messages and may not
    // change them.
    let mut session = pg::connect(&role_url);
    let error = diesel::sql_query("SELECT 1 / 0")
        .execute(&mut session)
        .unwrap_err();
    assert_eq!(error.to_string(), "Division durch Null");
    let error = session.batch_execute("SET lc_messages = 'C'").unwrap_err();
    assert!(error.to_string().contains("lc_messages"), "{error}");
    drop(session);

    // The layer opens as that role (it used to refuse it) and writes.
    let db = Options::new()
        .lock_timeout(Duration::from_millis(300))
        .retry(RetryPolicy::new().max_elapsed(Duration::from_secs(60)))
        .open_postgres(&role_url, MIGRATIONS)
        .unwrap();
    db.write(|conn| increment(conn, "a").map_err(Error::from))
        .unwrap();
    // A foreign session holds the row for 2 s, several lock timeouts: each is reported in
    // German ("storniere Anfrage wegen Zeitüberschreitung einer Sperre"), told by its
    // SQLSTATE, 55P03, and retried until the holder ends; then the write commits.
    let mut foreign = foreign_row_lock(&url, "a");
    let holder = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        foreign.batch_execute("COMMIT").unwrap();
    });
    let (value, stats) = db
        .write_measured(|conn| increment(conn, "a").map_err(Error::from))
        .unwrap();
    holder.join().unwrap();
    assert_eq!(value, 2);
    assert!(stats.attempts >= 2, "{stats:?}");
}

/// Ends every session of the database `url` names but the caller's (as a server restart or
/// a failover would).
fn terminate_others(url: &str) {
    let mut admin = pg::connect(url);
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .unwrap();
}

#[test]
fn sessions_lost_while_the_write_queue_is_in_use_are_replaced_at_once() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let db = Options::new()
        .lock_timeout(Duration::from_millis(200))
        .retry(RetryPolicy::new().max_elapsed(Duration::from_secs(5)))
        .open_postgres(&url, MIGRATIONS)
        .unwrap();
    db.write(|conn| increment(conn, "a").map_err(Error::from))
        .unwrap();
    // A conflict: the handle's next writes take the write queue first.
    let mut foreign = foreign_row_lock(&url, "a");
    let holder = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        foreign.batch_execute("COMMIT").unwrap();
    });
    let (_, stats) = db
        .write_measured(|conn| increment(conn, "a").map_err(Error::from))
        .unwrap();
    holder.join().unwrap();
    assert!(stats.attempts >= 2, "{stats:?}");
    // The server ends the layer's sessions; the next write meets the loss on the queue's
    // own statement, and runs on a fresh session (it retried on the dead one until the
    // deadline, and gave up as Busy: "connection lost: no connection to the server").
    terminate_others(&url);
    let (value, stats) = db
        .write_measured(|conn| increment(conn, "a").map_err(Error::from))
        .unwrap();
    assert_eq!(value, 3);
    assert!(stats.attempts <= 3, "{stats:?}");
}

/// A password with an unencoded `?` (which libpq reads as the password's, and logs in with)
/// is never shown: not by the handle's URL, not in the `tracing` events, not in an error. It
/// was: redaction cut the user information at the first `?`.
#[test]
fn a_password_libpq_reads_past_a_question_mark_is_never_shown() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    // postgresql:///NAME?host=DIR&user=postgres, with the user information given instead.
    let (head, query) = url.split_once('?').unwrap();
    let name = head.rsplit('/').next().unwrap();
    let host = query
        .split('&')
        .find_map(|param| param.strip_prefix("host="))
        .unwrap();
    let secret = format!("postgresql://postgres:ok?Secret9@/{name}?host={host}");
    let captured = common::Captured::default();
    let db = tracing::subscriber::with_default(captured.subscriber(tracing::Level::DEBUG), || {
        PgDatabase::open(&secret, MIGRATIONS)
    })
    .unwrap();
    assert!(!db.url().contains("Secret9"), "{}", db.url());
    let missing = secret.replace(&format!("/{name}?"), "/no_such_database?");
    let error =
        tracing::subscriber::with_default(captured.subscriber(tracing::Level::DEBUG), || {
            PgDatabase::open(&missing, MIGRATIONS)
        })
        .unwrap_err();
    let chain = common::chain(&error);
    assert!(!chain.contains("Secret9"), "{chain}");
    assert!(chain.contains("postgres:***@"), "{chain}");
    let events = captured.text();
    assert!(!events.contains("Secret9"), "{events}");
}
