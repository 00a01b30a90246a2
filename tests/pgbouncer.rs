//! PostgreSQL behind a real PgBouncer in transaction pooling mode (see `common::bouncer`):
//! each transaction, and each statement outside one, runs on whichever server connection
//! is free, so nothing a session keeps outside a transaction (a session advisory lock, a
//! `SET`, a prepared statement) stays with it. The bouncer hands its idle server
//! connections out in turn (`server_round_robin`) in most of these tests, so that a
//! session's consecutive transactions surely move.

mod common;

use std::cell::Cell;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use sqlite_persistence::{Error, Options, PgDatabase, PgStatus, RetryPolicy};

use common::bouncer::{self, Order};
use common::{bump_in_pg, pg, MIGRATIONS};

#[derive(QueryableByName, Debug)]
struct Value {
    #[diesel(sql_type = BigInt)]
    value: i64,
}

#[derive(QueryableByName, Debug)]
struct Setting {
    #[diesel(sql_type = Text)]
    setting: String,
}

fn number(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<Value>(conn)
        .unwrap()
        .value
}

/// The advisory locks held in `direct`'s database, read on the server itself.
fn advisory_locks(direct: &str) -> i64 {
    number(
        &mut pg::connect(direct),
        "SELECT count(*) AS value FROM pg_locks WHERE locktype = 'advisory' \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
}

/// Counts `name` up by one with statements Diesel never keeps prepared (`sql_query`),
/// returning the new value.
fn bump_unprepared(conn: &mut PgConnection, name: &str) -> QueryResult<i64> {
    diesel::sql_query(
        "INSERT INTO counters (name, value) VALUES ($1, 1) \
         ON CONFLICT (name) DO UPDATE SET value = counters.value + 1 RETURNING value",
    )
    .bind::<Text, _>(name)
    .get_result::<Value>(conn)
    .map(|row| row.value)
}

/// Options for a handle behind the bouncer: declared, with a deadline that a stuck lock
/// would exhaust in bounded time.
fn pooled() -> Options {
    Options::new()
        .transaction_pooling(true)
        .retry(RetryPolicy::new().max_elapsed(Duration::from_secs(20)))
}

#[test]
fn an_undeclared_transaction_pooler_is_refused_at_open_naming_the_url() {
    for order in [Order::LastUsed, Order::RoundRobin] {
        let Some((direct, bounced)) = bouncer::fresh_database(order) else {
            return;
        };
        bouncer::warm(&bounced, 3);
        let error = PgDatabase::open(&bounced, MIGRATIONS).unwrap_err();
        assert!(
            matches!(&error, Error::TransactionPooling { url, seen }
                if url.contains("port=6432") && seen.contains("server process")),
            "{order:?}: {error:?}"
        );
        assert!(
            error.hint().unwrap().contains("transaction_pooling(true)"),
            "{error}"
        );
        // Refused before anything was written.
        assert_eq!(
            number(
                &mut pg::connect(&direct),
                "SELECT count(*) AS value FROM pg_tables WHERE schemaname = 'public'"
            ),
            0
        );
        // Declared as no pooler, the open takes the word for it and does not check (the
        // check costs every open a session): it opens.
        drop(
            sqlite_persistence::Options::new()
                .transaction_pooling(false)
                .open_postgres(&bounced, MIGRATIONS)
                .unwrap(),
        );
        pg::connect(&direct)
            .batch_execute(
                "DROP TABLE counters, events, __diesel_schema_migrations, \
                 __sqlite_persistence_checksums CASCADE",
            )
            .unwrap();
        // The server itself is never taken for a pooler, nor a session pooler; and the
        // declared pooler opens.
        drop(PgDatabase::open(&direct, MIGRATIONS).unwrap());
        let session = bouncer::through_bouncer(&direct, Order::Session).unwrap();
        bouncer::warm(&session, 3);
        drop(PgDatabase::open(&session, MIGRATIONS).unwrap());
        let db = pooled().open_postgres(&bounced, MIGRATIONS).unwrap();
        db.write(|conn| bump_in_pg(conn, "a").map_err(Error::from))
            .unwrap();
    }
}

#[test]
fn session_settings_neither_leak_to_other_clients_nor_go_missing() {
    let Some((_, bounced)) = bouncer::fresh_database(Order::RoundRobin) else {
        return;
    };
    bouncer::warm(&bounced, 3);
    let db = pooled()
        .statement_timeout(Some(Duration::from_millis(300)))
        .open_postgres(&bounced, MIGRATIONS)
        .unwrap();
    db.write(|conn| bump_in_pg(conn, "a").map_err(Error::from))
        .unwrap();
    // Another client of the bouncer, on each of its server connections in turn: none has
    // the handle's timeout.
    let mut other = pg::connect(&bounced);
    for _ in 0..6 {
        let seen = diesel::sql_query("SELECT current_setting('statement_timeout') AS setting")
            .get_result::<Setting>(&mut other)
            .unwrap()
            .setting;
        assert_eq!(
            seen, "0",
            "the handle's session setting leaked to another client"
        );
    }
    // That client sets its own, on each server connection in turn; the handle's writes and
    // reads still end a runaway statement.
    for _ in 0..6 {
        other
            .batch_execute("SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0")
            .unwrap();
    }
    for _ in 0..3 {
        let error = db
            .write(|conn| {
                conn.batch_execute("SELECT pg_sleep(5)")
                    .map_err(Error::from)
            })
            .unwrap_err();
        assert!(
            format!("{error:?}").contains("statement timeout"),
            "a write ran past its statement timeout: {error:?}"
        );
        let error = db
            .read(|conn| {
                conn.batch_execute("SELECT pg_sleep(5)")
                    .map_err(Error::from)
            })
            .unwrap_err();
        assert!(
            format!("{error:?}").contains("statement timeout"),
            "a read ran past its statement timeout: {error:?}"
        );
    }
}

/// A pooler in statement pooling mode closes every session that begins a transaction. The
/// open (whether a pooler is declared or not) and the status read say so, naming the URL,
/// instead of "server closed the connection unexpectedly"; nothing is written, and the server
/// itself is not taken for one.
#[test]
fn a_statement_pooler_is_named_as_such() {
    let Some((direct, bounced)) = bouncer::fresh_database(Order::Statement) else {
        return;
    };
    let statement_pooling = |error: &Error| {
        matches!(error, Error::StatementPooling { url } if url.contains("port=6432"))
            && error.hint().unwrap().contains("pool_mode = session")
    };
    for declared in [false, true] {
        let error = Options::new()
            .transaction_pooling(declared)
            .open_postgres(&bounced, MIGRATIONS)
            .unwrap_err();
        assert!(statement_pooling(&error), "declared {declared}: {error:?}");
        let error = PgStatus::read(
            &bounced,
            MIGRATIONS,
            &Options::new().transaction_pooling(declared),
        )
        .unwrap_err();
        assert!(statement_pooling(&error), "declared {declared}: {error:?}");
    }
    // Opens at once: the pooler moves one open's statements between server connections as a
    // transaction pooler would; it is still named a statement pooler.
    std::thread::scope(|scope| {
        let opens: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| PgDatabase::open(&bounced, MIGRATIONS).unwrap_err()))
            .collect();
        for open in opens {
            let error = open.join().unwrap();
            assert!(statement_pooling(&error), "{error:?}");
        }
    });
    assert_eq!(
        number(
            &mut pg::connect(&direct),
            "SELECT count(*) AS value FROM pg_tables WHERE schemaname = 'public'"
        ),
        0
    );
    drop(PgDatabase::open(&direct, MIGRATIONS).unwrap());
}

/// `PgStatus::read` (the command line's `status`) through the bouncer, declared or not,
/// reads the database's state and leaves none of its settings on the pooler's server
/// connections for the pooler's other clients (one that names itself keeps its name).
#[test]
fn status_through_a_transaction_pooler_leaves_no_setting_behind() {
    let Some((direct, bounced)) = bouncer::fresh_database(Order::RoundRobin) else {
        return;
    };
    drop(PgDatabase::open(&direct, MIGRATIONS).unwrap());
    bouncer::warm(&bounced, 3);
    for declared in [false, true] {
        let options = Options::new()
            .transaction_pooling(declared)
            .statement_timeout(Some(Duration::from_millis(4321)))
            .lock_timeout(Duration::from_millis(1234))
            .idle_in_transaction_timeout(Some(Duration::from_millis(5678)));
        let status = PgStatus::read(&bounced, MIGRATIONS, &options).unwrap();
        assert_eq!(status.applied.len(), common::VERSIONS.len(), "{status:?}");
        assert!(status.pending.is_empty(), "{status:?}");
        let mut other = pg::connect(&bounced);
        for _ in 0..6 {
            for name in [
                "statement_timeout",
                "lock_timeout",
                "idle_in_transaction_session_timeout",
            ] {
                let seen =
                    diesel::sql_query(format!("SELECT current_setting('{name}') AS setting"))
                        .get_result::<Setting>(&mut other)
                        .unwrap()
                        .setting;
                assert_eq!(seen, "0", "declared {declared}: status left {name} behind");
            }
        }
        // A client that names itself keeps its name on every server connection.
        let mut named = pg::connect(&format!("{bounced}&application_name=neighbour"));
        for _ in 0..6 {
            let name = diesel::sql_query("SELECT current_setting('application_name') AS setting")
                .get_result::<Setting>(&mut named)
                .unwrap()
                .setting;
            assert_eq!(name, "neighbour", "declared {declared}");
        }
    }
}

/// Another client of the pooler leaves session settings on its server connections that
/// change where unqualified names go, whether a commit is durable and whether a transaction
/// may write. The declared handle's migrations, writes, reads and status run with the
/// database's own settings all the same; nothing lands in the other client's schema.
#[test]
fn settings_other_clients_leave_on_the_poolers_connections_do_not_reach_the_handle() {
    let Some((direct, bounced)) = bouncer::fresh_database(Order::RoundRobin) else {
        return;
    };
    // The test server runs with synchronous_commit off; this database, with it on.
    // And a role the test's user may become, whose schema "$user" would name.
    let neighbour = format!("neighbour_{}", std::process::id());
    pg::connect(&direct)
        .batch_execute(&format!(
            "CREATE SCHEMA elsewhere; DO $$ BEGIN EXECUTE format(\
             'ALTER DATABASE %I SET synchronous_commit = on', current_database()); END $$; \
             DO $$ BEGIN CREATE ROLE {neighbour}; EXCEPTION WHEN duplicate_object THEN NULL; \
             END $$; GRANT {neighbour} TO CURRENT_USER; \
             CREATE SCHEMA {neighbour} AUTHORIZATION {neighbour}"
        ))
        .unwrap();
    bouncer::warm(&bounced, 3);
    let mut other = pg::connect(&bounced);
    for _ in 0..9 {
        other
            .batch_execute(&format!(
                "SET search_path = elsewhere; SET synchronous_commit = off; \
                 SET default_transaction_read_only = on; SET ROLE {neighbour}"
            ))
            .unwrap();
    }
    let seen = |conn: &mut PgConnection| -> QueryResult<String> {
        diesel::sql_query(
            "SELECT current_setting('search_path') || ' ' || current_setting('synchronous_commit') \
             || ' ' || current_setting('transaction_read_only') \
             || ' ' || (current_user = session_user)::text AS setting",
        )
        .get_result::<Setting>(conn)
        .map(|row| row.setting)
    };
    // The other client's settings are there, on every server connection.
    for _ in 0..3 {
        assert_eq!(seen(&mut other).unwrap(), "elsewhere off on false");
    }
    let db = pooled().open_postgres(&bounced, MIGRATIONS).unwrap();
    for _ in 0..6 {
        let (value, settings) = db
            .write(|conn| {
                let value = bump_in_pg(conn, "a")?;
                Ok::<_, Error>((value, seen(conn)?))
            })
            .unwrap();
        assert_eq!(settings, "\"$user\", public on off true", "write {value}");
        let settings = db.read(|conn| seen(conn).map_err(Error::from)).unwrap();
        assert_eq!(settings, "\"$user\", public on on true");
    }
    let status = PgStatus::read(&bounced, MIGRATIONS, &pooled()).unwrap();
    assert!(status.pending.is_empty(), "{status:?}");
    let mut direct = pg::connect(&direct);
    assert_eq!(
        number(
            &mut direct,
            "SELECT value::bigint AS value FROM public.counters WHERE name = 'a'"
        ),
        6
    );
    assert_eq!(
        number(
            &mut direct,
            &format!(
                "SELECT count(*) AS value FROM pg_tables \
                 WHERE schemaname IN ('elsewhere', '{neighbour}')"
            )
        ),
        0
    );
}

#[test]
fn statements_prepared_in_one_transaction_are_not_expected_in_the_next() {
    let Some((direct, bounced)) = bouncer::fresh_database(Order::RoundRobin) else {
        return;
    };
    bouncer::warm(&bounced, 3);
    let db = pooled().open_postgres(&bounced, MIGRATIONS).unwrap();
    // Diesel's query builder statements, the same ones each time: what its statement cache
    // keeps prepared on a session.
    for expected in 1..=6 {
        let value = db
            .write(|conn| bump_in_pg(conn, "a").map_err(Error::from))
            .unwrap();
        assert_eq!(value, expected);
    }
    assert_eq!(
        number(
            &mut pg::connect(&direct),
            "SELECT value FROM counters WHERE name = 'a'"
        ),
        6
    );
}

#[test]
fn conflicting_writes_leave_no_lock_on_the_poolers_server_connections() {
    let Some((direct, bounced)) = bouncer::fresh_database(Order::RoundRobin) else {
        return;
    };
    bouncer::warm(&bounced, 4);
    let db = pooled().open_postgres(&bounced, MIGRATIONS).unwrap();
    for round in 0..4 {
        // A serialization failure on the first attempt: the write runs again (with the
        // write queue's turn, where there is one), and the next writes meet a recent
        // conflict.
        let first = Cell::new(true);
        let value = db
            .write(|conn| {
                let value = bump_unprepared(conn, "hot")?;
                if first.replace(false) {
                    conn.batch_execute(
                        "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
                    )?;
                }
                Ok::<_, Error>(value)
            })
            .unwrap();
        assert_eq!(value, round * 2 + 1);
        db.write(|conn| bump_unprepared(conn, "hot").map_err(Error::from))
            .unwrap();
    }
    assert_eq!(
        advisory_locks(&direct),
        0,
        "a lock was left held on a server connection of the pooler"
    );
}

/// The test schema, then an index built outside a transaction.
fn migrations_with_a_concurrent_index(
) -> (tempfile::TempDir, diesel_migrations::FileBasedMigrations) {
    let dir = tempfile::tempdir().unwrap();
    for (name, up, transactional) in [
        (
            "2026-12-01-000001_create_counters",
            "CREATE TABLE counters (name TEXT PRIMARY KEY NOT NULL, value BIGINT NOT NULL DEFAULT 0);",
            true,
        ),
        (
            "2026-12-01-000002_index_values",
            "CREATE INDEX CONCURRENTLY counters_by_value ON counters (value);",
            false,
        ),
    ] {
        let m = dir.path().join(name);
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("up.sql"), up).unwrap();
        std::fs::write(m.join("down.sql"), "SELECT 1;").unwrap();
        if !transactional {
            std::fs::write(m.join("metadata.toml"), "run_in_transaction = false\n").unwrap();
        }
    }
    let source = diesel_migrations::FileBasedMigrations::from_path(dir.path()).unwrap();
    (dir, source)
}

#[test]
fn a_migration_outside_a_transaction_applies_once_through_the_pooler_under_a_lock_it_keeps() {
    let Some((direct, bounced)) = bouncer::fresh_database(Order::RoundRobin) else {
        return;
    };
    bouncer::warm(&bounced, 3);
    // Four processes' worth of opens at once, each with its own sessions.
    let start = std::sync::Arc::new(std::sync::Barrier::new(4));
    let (done, opened) = std::sync::mpsc::channel();
    for _ in 0..4 {
        let (start, bounced, done) = (start.clone(), bounced.clone(), done.clone());
        std::thread::spawn(move || {
            let (_dir, source) = migrations_with_a_concurrent_index();
            start.wait();
            let _ = done.send(
                pooled()
                    .open_postgres(&bounced, source)
                    .map(|db| db.applied_at_open().len()),
            );
        });
    }
    // Bounded: an index build that waits for the lock's own session never ends.
    let applied: Vec<usize> = (0..4)
        .map(|_| {
            opened
                .recv_timeout(Duration::from_secs(60))
                .expect("an open did not end within 60 s")
                .unwrap()
        })
        .collect();
    // One applied both; the others found them applied.
    assert_eq!(applied.iter().sum::<usize>(), 2, "{applied:?}");
    assert!(applied.contains(&2), "{applied:?}");
    let mut conn = pg::connect(&direct);
    assert_eq!(
        number(
            &mut conn,
            "SELECT count(*) AS value FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = 'counters_by_value' AND i.indisvalid"
        ),
        1
    );
    assert_eq!(
        number(
            &mut conn,
            "SELECT count(*) AS value FROM __diesel_schema_migrations"
        ),
        2
    );
    assert_eq!(advisory_locks(&direct), 0);
    // Nothing of the lock's session stays open.
    assert!(pg::wait_until(Duration::from_secs(30), || number(
        &mut conn,
        "SELECT count(*) AS value FROM pg_stat_activity \
         WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
    ) == 0));
}

#[test]
fn a_write_after_a_conflict_waits_its_turn_and_then_sees_the_commit_it_waited_for() {
    let Some((direct, bounced)) = bouncer::fresh_database(Order::RoundRobin) else {
        return;
    };
    bouncer::warm(&bounced, 3);
    let db = std::sync::Arc::new(pooled().open_postgres(&bounced, MIGRATIONS).unwrap());
    db.write(|conn| bump_unprepared(conn, "hot").map_err(Error::from))
        .unwrap();
    let (inside, is_inside) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    // Each writer meets a conflict on its first attempt, so it runs again queued (whatever
    // the time since the handle's last conflict). The first holds its turn until released.
    let conflict = |conn: &mut PgConnection| {
        conn.batch_execute("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
    };
    let first = {
        let db = db.clone();
        std::thread::spawn(move || {
            let attempt = Cell::new(0);
            db.write(|conn| {
                attempt.set(attempt.get() + 1);
                if attempt.get() == 1 {
                    conflict(conn)?;
                }
                let value = bump_unprepared(conn, "hot")?;
                inside.send(()).unwrap();
                released.recv_timeout(Duration::from_secs(30)).unwrap();
                Ok::<_, Error>(value)
            })
            .unwrap()
        })
    };
    is_inside.recv_timeout(Duration::from_secs(30)).unwrap();
    let second = {
        let db = db.clone();
        std::thread::spawn(move || {
            let attempt = Cell::new(0);
            db.write_measured(|conn| {
                attempt.set(attempt.get() + 1);
                if attempt.get() == 1 {
                    conflict(conn)?;
                }
                Ok::<_, Error>(bump_unprepared(conn, "hot")?)
            })
            .unwrap()
        })
    };
    // The second writer waits (for its turn, or, without a queue, for the row the first
    // holds) before the first commits.
    assert!(pg::wait_until(Duration::from_secs(30), || {
        number(
            &mut pg::connect(&direct),
            "SELECT count(*) AS value FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE NOT l.granted AND a.datname = current_database()",
        ) > 0
    }));
    release.send(()).unwrap();
    assert_eq!(first.join().unwrap(), 2);
    let (value, stats) = second.join().unwrap();
    // Its queued attempt's snapshot was taken after the commit it waited for: it committed,
    // with no third attempt.
    assert_eq!((value, stats.attempts), (3, 2));
    assert_eq!(advisory_locks(&direct), 0);
}

#[test]
fn a_session_pooler_with_one_server_connection_is_opened_without_waiting_for_a_second() {
    let Some((direct, _)) = bouncer::fresh_database(Order::LastUsed) else {
        return;
    };
    let Some(single) = bouncer::through_bouncer(&direct, Order::SessionOfOne) else {
        return;
    };
    // The check's second session waits for the server connection the first one keeps: it
    // is given up on after a few seconds, and the open goes on checked with one (it waited
    // for PgBouncer's query_wait_timeout, 120 s, past the 30 s deadline).
    let (done, opened) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(
            Options::new()
                .pool_size(1)
                .retry(RetryPolicy::new().max_elapsed(Duration::from_secs(20)))
                .open_postgres(&single, MIGRATIONS)
                .map(drop),
        );
    });
    opened
        .recv_timeout(Duration::from_secs(60))
        .expect("the open waited past a minute")
        .unwrap();
}
