//! PostgreSQL servers that are not simply there: starting late, full, not answering, or
//! ending a session while its `COMMIT` is in flight. Each test runs a private cluster of its
//! own (see `common::pg::Cluster`), which it stops, fills or disturbs.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use sqlite_persistence::{Error, Options, PgDatabase, RetryPolicy};

use common::pg::{self, Cluster};
use common::MIGRATIONS;

use common::bump_in_pg as increment;
use common::pg::within;

/// Opens `url` with the migrations of `dir` on a thread of its own (deadline 60 s).
fn open_in_background(
    url: &str,
    dir: &std::path::Path,
) -> std::thread::JoinHandle<sqlite_persistence::Result<PgDatabase>> {
    let (url, path) = (url.to_owned(), dir.to_owned());
    std::thread::spawn(move || {
        options(Duration::from_secs(60)).open_postgres(
            &url,
            diesel_migrations::FileBasedMigrations::from_path(path).unwrap(),
        )
    })
}

/// Ends (as a restart would) the sessions running a statement that contains `pattern` (a
/// `LIKE` pattern), once one does (waiting at most 60 s); whether one did.
fn end_sessions_running(admin: &mut PgConnection, pattern: &str) -> bool {
    pg::wait_until(Duration::from_secs(60), || {
        diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE query LIKE '%{pattern}%' AND pid <> pg_backend_pid()"
        ))
        .get_result::<i64>(admin)
        .unwrap()
            > 0
    })
}

fn options(deadline: Duration) -> Options {
    Options::new().retry(RetryPolicy::new().max_elapsed(deadline))
}

#[test]
fn an_open_waits_for_a_server_that_starts_late() {
    let Some(cluster) = Cluster::private("") else {
        return;
    };
    let url = cluster.fresh_database();
    cluster.stop("fast");
    // The socket is gone: the open meets "No such file or directory", then "Connection
    // refused" or 57P03 ("the database system is starting up"). It failed at once.
    let opening = {
        let url = url.clone();
        std::thread::spawn(move || options(Duration::from_secs(60)).open_postgres(&url, MIGRATIONS))
    };
    std::thread::sleep(Duration::from_millis(300));
    cluster.start_again("", false);
    let db = within(Duration::from_secs(90), move || opening.join().unwrap())
        .expect("the open gave up on a server that was starting");
    assert_eq!(
        db.write(|conn| increment(conn, "a").map_err(Error::from))
            .unwrap(),
        1
    );
}

#[test]
fn an_open_waits_for_a_standby_to_be_promoted() {
    // A URL that asks for a writable session (as a failover's does) and leads only to a
    // standby, as a writer endpoint does while a failover moves it: the standby is promoted
    // once it has refused the open. It failed at once: "session is read-only".
    let Some(primary) = Cluster::private("") else {
        return;
    };
    let standby = Cluster::standby_of(&primary, "-c log_connections=on")
        .unwrap_or_else(|e| panic!("cannot start a standby: {e}"));
    let name = primary.fresh_database_name();
    assert!(
        pg::wait_until(Duration::from_secs(60), || PgConnection::establish(
            &standby.url(&name)
        )
        .is_ok()),
        "the standby never replayed the database's creation"
    );
    primary.stop("fast");
    let url = Cluster::failover_url(&[&standby], &name);
    // The standby logs each session (log_connections), the check of the replay's too: the
    // open's attempts are the ones after it. A second attempt means the first was refused
    // and the open went on waiting.
    let asked = format!("database={name}");
    let before = standby.log().matches(&asked).count();
    let opening = {
        let url = url.clone();
        std::thread::spawn(move || options(Duration::from_secs(60)).open_postgres(&url, MIGRATIONS))
    };
    assert!(
        pg::wait_until(Duration::from_secs(60), || standby
            .log()
            .matches(&asked)
            .count()
            > before + 1
            || opening.is_finished()),
        "the open never reached the standby"
    );
    assert!(
        !opening.is_finished(),
        "the open did not wait for the promotion: {:?}",
        opening.join().unwrap().map(|_| ())
    );
    standby.promote();
    let db = within(Duration::from_secs(90), move || opening.join().unwrap())
        .expect("the open gave up on a standby being promoted");
    assert_eq!(
        db.write(|conn| increment(conn, "a").map_err(Error::from))
            .unwrap(),
        1
    );
}

#[test]
fn an_open_waits_for_a_free_connection_slot() {
    waits_for_a_free_connection_slot("", "remaining connection slots are reserved");
}

/// The same on a server whose messages are German: a failed connection carries no SQLSTATE,
/// and the server's refusal is in its `lc_messages` (38 of 64 opens failed against a full
/// German server). Skipped where the system has no German locale for the server to use
/// (failed under `PG_TESTS_REQUIRED`, whose `.ci/run` makes the locale).
#[test]
fn an_open_waits_for_a_free_connection_slot_on_a_server_that_speaks_german() {
    let locales = std::process::Command::new("locale").arg("-a").output();
    let Some(locale) = locales.ok().and_then(|out| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.eq_ignore_ascii_case("de_DE.utf8") || l.eq_ignore_ascii_case("de_DE.UTF-8"))
            .map(str::to_owned)
    }) else {
        let why = "no German locale (de_DE.UTF-8) on this system; make it with `localedef -i \
                   de_DE -f UTF-8 de_DE.UTF-8`";
        if std::env::var(pg::PG_TESTS_REQUIRED).as_deref() == Ok("1") {
            panic!("{why}");
        }
        eprintln!("skipped: {why}");
        return;
    };
    waits_for_a_free_connection_slot(
        &format!("-c lc_messages={locale}"),
        "die verbleibenden Verbindungen sind",
    );
}

/// A server with three slots for ordinary roles, all taken: an open waits until one frees.
/// `extra` are the server's settings; `full` is in the message of a refused connection.
fn waits_for_a_free_connection_slot(extra: &str, full: &str) {
    // Three slots for ordinary roles (and three more reserved for superusers).
    let Some(cluster) = Cluster::private(&format!(
        "-c max_connections=6 -c superuser_reserved_connections=3 {extra}"
    )) else {
        return;
    };
    let admin_url = cluster.fresh_database();
    let mut admin = pg::connect(&admin_url);
    admin
        .batch_execute("CREATE ROLE app LOGIN; GRANT ALL ON SCHEMA public TO app;")
        .unwrap();
    drop(admin);
    let url = admin_url.replace("user=postgres", "user=app");
    // Every ordinary slot taken.
    let mut taken: Vec<PgConnection> = (0..3).map(|_| pg::connect(&url)).collect();
    let refused = PgConnection::establish(&url)
        .err()
        .expect("a fourth session opened");
    assert!(refused.to_string().contains(full), "{refused}");
    let opening = {
        let url = url.clone();
        std::thread::spawn(move || {
            options(Duration::from_secs(60))
                .pool_size(1)
                .open_postgres(&url, MIGRATIONS)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // The open is still waiting; a slot frees.
    assert!(!opening.is_finished(), "{:?}", opening.join());
    taken.pop();
    let db = within(Duration::from_secs(90), move || opening.join().unwrap())
        .expect("the open gave up on a full server");
    drop(taken);
    db.write(|conn| increment(conn, "a").map_err(Error::from))
        .unwrap();
}

#[test]
fn a_server_that_never_answers_is_given_up_on() {
    // A listener that accepts and never says a word: libpq waited for it without end.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let url = format!("postgresql://app@127.0.0.1:{port}/app");
    let error = within(Duration::from_secs(60), move || {
        options(Duration::from_secs(3))
            .open_postgres(&url, MIGRATIONS)
            .unwrap_err()
    });
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    assert!(
        common::chain(&error).contains("timeout expired"),
        "{}",
        common::chain(&error)
    );
}

/// A write whose `COMMIT` commits locally and then waits for a synchronous standby that
/// never comes, while another thread, once it sees it waiting, calls `disturb` (which ends
/// its session): what the write returned, how often its closure ran, and what is stored.
fn commit_lost_after_it_committed(
    lookup: bool,
    disturb: impl Fn(&Cluster, &mut PgConnection, i32) + Send + 'static,
) -> Option<(sqlite_persistence::Result<i64>, u32, i64)> {
    let cluster = std::sync::Arc::new(Cluster::private("")?);
    let url = cluster.fresh_database();
    let name = url
        .split('?')
        .next()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    // Every other commit of the database does not wait; then the standby is asked for.
    let mut setup = pg::connect(&url);
    for sql in [
        format!("ALTER DATABASE {name} SET synchronous_commit = local"),
        "ALTER SYSTEM SET synchronous_standby_names = 'nobody'".to_owned(),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        setup.batch_execute(&sql).unwrap();
    }
    // pg_control keeps a checkpoint's time in whole seconds: a checkpoint in the second a
    // write began may have come after it, and proves nothing. The write begins later.
    let later = pg::wait_until(Duration::from_secs(10), || {
        diesel::dsl::sql::<diesel::sql_types::Bool>(
            "SELECT floor(extract(epoch FROM clock_timestamp())) > \
               (SELECT extract(epoch FROM checkpoint_time) FROM pg_control_checkpoint())",
        )
        .get_result::<bool>(&mut setup)
        .unwrap()
    });
    assert!(later);
    let db = options(Duration::from_secs(60))
        .lost_commit_lookup(lookup)
        .open_postgres(&url, MIGRATIONS)
        .unwrap();
    let ender = {
        let url = url.clone();
        let cluster = std::sync::Arc::clone(&cluster);
        std::thread::spawn(move || {
            let mut admin = pg::connect(&url);
            #[derive(QueryableByName)]
            struct Pid {
                #[diesel(sql_type = diesel::sql_types::Integer)]
                pid: i32,
            }
            let mut waiting = None;
            pg::wait_until(Duration::from_secs(60), || {
                waiting = diesel::sql_query(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
                )
                .get_result::<Pid>(&mut admin)
                .ok()
                .map(|p| p.pid);
                waiting.is_some()
            });
            let pid = waiting.expect("no COMMIT waited for the standby");
            disturb(&cluster, &mut admin, pid);
        })
    };
    let (written, runs) = within(Duration::from_secs(90), move || {
        let mut runs = 0;
        let written = db.write(|conn| -> sqlite_persistence::Result<i64> {
            runs += 1;
            conn.batch_execute("SET LOCAL synchronous_commit = on")?;
            Ok(increment(conn, "a")?)
        });
        (written, runs)
    });
    ender.join().unwrap();
    let stored: i64 = diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "SELECT coalesce(max(value), 0) FROM counters WHERE name = 'a'",
    )
    .get_result(&mut pg::connect(&url))
    .unwrap();
    Some((written, runs, stored))
}

#[test]
fn a_commit_whose_session_was_lost_is_answered_by_what_the_server_says() {
    let Some((written, runs, stored)) = commit_lost_after_it_committed(true, terminate) else {
        return;
    };
    // It committed, once: the write says so and was not run again. It was
    // CommitOutcomeUnknown.
    assert_eq!(written.unwrap(), 1);
    assert_eq!((runs, stored), (1, 1));
}

#[test]
fn without_the_lookup_a_lost_commit_is_unknown() {
    let Some((written, runs, stored)) = commit_lost_after_it_committed(false, terminate) else {
        return;
    };
    let error = written.unwrap_err();
    assert!(
        matches!(error, Error::CommitOutcomeUnknown { .. }),
        "{error:?}"
    );
    assert_eq!((runs, stored), (1, 1));
}

fn terminate(_: &Cluster, admin: &mut PgConnection, pid: i32) {
    admin
        .batch_execute(&format!("SELECT pg_terminate_backend({pid})"))
        .unwrap();
}

#[test]
fn a_commit_lost_in_a_crash_is_reported_unknown_and_never_run_again() {
    // After a crash the server may hand the transaction's id out again: its status proves
    // nothing, and the write must not claim either outcome.
    let Some((written, runs, stored)) =
        commit_lost_after_it_committed(true, |cluster, _, _| cluster.restart("immediate"))
    else {
        return;
    };
    let error = written.unwrap_err();
    assert!(
        matches!(error, Error::CommitOutcomeUnknown { .. }),
        "{error:?}"
    );
    assert!(error.hint().is_some());
    assert_eq!(runs, 1);
    // It had committed locally, and the crash kept it.
    assert_eq!(stored, 1);
}

#[test]
fn a_commit_lost_before_it_committed_is_run_again() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let db = PgDatabase::open(&url, MIGRATIONS).unwrap();
    // A deferred trigger fires at COMMIT, before the commit record, and ends its own
    // session there the first time only (a sequence is not rolled back).
    pg::connect(&url)
        .batch_execute(
            "CREATE SEQUENCE kills;
             CREATE TABLE doomed (x INT);
             CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF nextval('kills') = 1 THEN PERFORM pg_terminate_backend(pg_backend_pid());
             END IF; RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER die AFTER INSERT ON doomed
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION die();",
        )
        .unwrap();
    let mut runs = 0;
    db.write(|conn| -> sqlite_persistence::Result<()> {
        runs += 1;
        conn.batch_execute("INSERT INTO doomed VALUES (1)")?;
        Ok(())
    })
    .unwrap();
    // The server said it had not committed: run again, once, and stored once.
    assert_eq!(runs, 2);
    let stored: i64 = diesel::dsl::sql::<diesel::sql_types::BigInt>("SELECT count(*) FROM doomed")
        .get_result(&mut pg::connect(&url))
        .unwrap();
    assert_eq!(stored, 1);
}

#[test]
fn a_migration_whose_session_is_ended_runs_again_on_a_new_one() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    common::migrations_dir(
        dir.path(),
        &[
            (
                "2026-12-01-000001_first",
                "CREATE TABLE first_table (x INT);",
                true,
            ),
            (
                "2026-12-01-000002_slow",
                "CREATE TABLE second_table (x INT); SELECT pg_sleep(1);",
                true,
            ),
        ],
    );
    let opening = open_in_background(&url, dir.path());
    // The server ends the session in the middle of the batch (as a restart would).
    let mut admin = pg::connect(&url);
    let ended = end_sessions_running(&mut admin, "pg_sleep(1)");
    assert!(ended, "the migration never ran");
    // It ran the batch again on a new session (it retried on the dead one until the
    // deadline), and applied both migrations once.
    let db = within(Duration::from_secs(90), move || opening.join().unwrap()).unwrap();
    assert_eq!(db.applied_at_open().len(), 2);
    let tables = diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "SELECT count(*) FROM pg_tables WHERE tablename IN ('first_table', 'second_table')",
    )
    .get_result::<i64>(&mut admin)
    .unwrap();
    assert_eq!(tables, 2);
}

#[test]
fn a_batch_with_one_migration_outside_a_transaction_keeps_the_others_atomic_in_runs() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    common::migrations_dir(
        dir.path(),
        &[
            ("2026-12-01-000001_a", "CREATE TABLE a (x INT);", true),
            ("2026-12-01-000002_b", "CREATE TABLE b (x INT);", true),
            (
                "2026-12-01-000003_slow",
                "CREATE TABLE c (x INT); SELECT pg_sleep(CASE WHEN to_regclass('slept') IS NULL \
                 THEN 30 ELSE 0 END);",
                true,
            ),
            (
                "2026-12-01-000004_index",
                "CREATE INDEX CONCURRENTLY a_x ON a (x);",
                false,
            ),
            ("2026-12-01-000005_d", "CREATE TABLE d (x INT);", true),
        ],
    );
    let opening = open_in_background(&url, dir.path());
    // The session is ended in the third migration: the open runs again on a new one.
    let mut admin = pg::connect(&url);
    let ended = end_sessions_running(&mut admin, "to_regclass(''slept'')");
    assert!(ended, "the slow migration never ran");
    // The first three are one run, applied all or none: none (the first two were applied,
    // each in a transaction of its own). The open runs again, and sleeps in the third again.
    let count = |sql: &str| {
        diesel::dsl::sql::<diesel::sql_types::BigInt>(sql)
            .get_result::<i64>(&mut pg::connect(&url))
            .unwrap()
    };
    assert_eq!(
        count("SELECT count(*) FROM pg_tables WHERE tablename IN ('a', 'b', 'c', 'd')"),
        0
    );
    // Without the sleep from now on (ended once more if it sleeps already), it applies the
    // whole batch, each migration once.
    admin
        .batch_execute(
            "CREATE TABLE slept (); SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE query LIKE '%to_regclass(''slept'')%' AND pid <> pg_backend_pid()",
        )
        .unwrap();
    let db = within(Duration::from_secs(90), move || opening.join().unwrap()).unwrap();
    assert_eq!(db.applied_at_open().len(), 5);
    assert_eq!(
        count("SELECT count(*) FROM pg_tables WHERE tablename IN ('a', 'b', 'c', 'd')"),
        4
    );
}

#[test]
fn a_role_that_may_not_read_the_wal_position_still_writes() {
    let Some(admin_url) = pg::fresh_database() else {
        return;
    };
    let role = format!("nowal_{}", std::process::id());
    let mut admin = pg::connect(&admin_url);
    for sql in [
        format!(
            "DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ),
        format!("GRANT ALL ON SCHEMA public TO {role}"),
        // In this database only: pg_proc is per database.
        "REVOKE EXECUTE ON FUNCTION pg_walfile_name(pg_lsn) FROM PUBLIC".to_owned(),
    ] {
        admin.batch_execute(&sql).unwrap();
    }
    let url = admin_url.replace("user=postgres", &format!("user={role}"));
    let db = options(Duration::from_secs(30))
        .open_postgres(&url, MIGRATIONS)
        .unwrap();
    // Its sessions cannot ask about a lost COMMIT, so they read no stamp (every write failed:
    // "permission denied for function pg_walfile_name").
    assert_eq!(
        db.write(|conn| increment(conn, "a").map_err(Error::from))
            .unwrap(),
        1
    );
}

#[test]
fn a_session_idle_with_the_migration_lock_is_not_waited_for_as_a_migration() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    // The layer's migration lock key: its default first half, and the database name's
    // FNV-1a hash.
    let name = url.split('?').next().unwrap().rsplit('/').next().unwrap();
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    }) as i32;
    let mut idle = pg::connect(&url);
    idle.batch_execute(&format!("SELECT pg_advisory_lock({}, {hash})", 0x5351_4c50))
        .unwrap();
    // It holds the lock and does nothing: the open gives up at its deadline, naming it,
    // instead of waiting the migration wait (10 minutes) for it.
    let error = within(Duration::from_secs(120), {
        let url = url.clone();
        move || {
            options(Duration::from_secs(1))
                .open_postgres(&url, MIGRATIONS)
                .unwrap_err()
        }
    });
    let Error::Busy { holders, .. } = &error else {
        panic!("{error:?}")
    };
    assert!(
        holders
            .iter()
            .any(|h| h.lock == sqlite_persistence::HeldLock::MigrationLock && h.operation.is_none()),
        "{error}"
    );
}

/// An open that waits for a server that is not there says so once, after a second, in an
/// event of its own: a program that keeps the retry loop's events quiet (the command line
/// shows only its last) was silent for the whole deadline. Run in a child process, alone
/// with its subscriber (in this binary, other tests meet the same event's callsite at once).
#[test]
fn an_open_waiting_for_the_server_says_so_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "postgresql:///app?host={}&user=app",
        dir.path().join("no-server-here").display()
    );
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "waiting_for_the_server_child",
            "--nocapture",
        ])
        .env("SP_WAITING_URL", &url)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("waiting for the server"))
        .collect();
    assert_eq!(said.len(), 1, "{stderr}");
    assert!(
        said[0].contains("sqlite_persistence::postgres::session")
            && said[0].contains("No such file or directory"),
        "{}",
        said[0]
    );
}

/// The child of [`an_open_waiting_for_the_server_says_so_once`]: opens `SP_WAITING_URL`
/// with a 2.5 s deadline, its `warn` events on stderr.
#[test]
#[ignore = "run by an_open_waiting_for_the_server_says_so_once"]
fn waiting_for_the_server_child() {
    let url = std::env::var("SP_WAITING_URL").unwrap();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .init();
    let error = options(Duration::from_millis(2500))
        .open_postgres(&url, MIGRATIONS)
        .unwrap_err();
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
}

/// Ends every other session of `url`'s database every 250 ms until `stop` is set (an open
/// takes a few of them on a loaded machine); how many it ended.
fn terminate_storm(url: &str, stop: &std::sync::atomic::AtomicBool) -> i64 {
    let mut admin = pg::connect(url);
    let mut ended = 0;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        ended += diesel::dsl::sql::<diesel::sql_types::BigInt>(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND backend_type = 'client backend'",
        )
        .get_result::<i64>(&mut admin)
        .unwrap();
        std::thread::sleep(Duration::from_millis(250));
    }
    ended
}

/// Sessions ended every 250 ms (as a storm of `pg_terminate_backend`, or a restarting server
/// would): opens run again when a session is lost during one of their steps, writes when
/// Diesel gives up on a session, and none fails or is lost. Plain Diesel under the same
/// storm fails (a session lost at each step).
#[test]
fn opens_and_writes_go_through_a_storm_of_ended_sessions() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(url) = pg::fresh_database() else {
        return;
    };
    drop(PgDatabase::open(&url, MIGRATIONS).unwrap());
    let (stop, writing) = (AtomicBool::new(false), AtomicBool::new(true));
    let (layer, plain, ended) = std::thread::scope(|scope| {
        let storm = scope.spawn(|| terminate_storm(&url, &stop));
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let url = &url;
                scope.spawn(move || {
                    let name = format!("w{w}");
                    let mut failures = Vec::new();
                    for _ in 0..6 {
                        let written = options(Duration::from_secs(60))
                            .open_postgres(url, MIGRATIONS)
                            .and_then(|db| {
                                (0..5).try_for_each(|_| {
                                    db.write(|conn| increment(conn, &name).map_err(Error::from))
                                        .map(drop)
                                })
                            });
                        if let Err(error) = written {
                            failures.push(format!("{error:?}"));
                        }
                    }
                    failures
                })
            })
            .collect();
        // Plain Diesel, while the layer's writers run: a session, and transactions of the
        // same statements on it until one fails.
        let plain = scope.spawn(|| {
            let mut failed = 0;
            while writing.load(Ordering::SeqCst) {
                match PgConnection::establish(&url) {
                    Err(_) => failed += 1,
                    Ok(mut conn) => {
                        while writing.load(Ordering::SeqCst) {
                            if conn.transaction(|conn| increment(conn, "plain")).is_err() {
                                failed += 1;
                                break;
                            }
                        }
                    }
                }
            }
            failed
        });
        let layer: Vec<String> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        writing.store(false, Ordering::SeqCst);
        let plain = plain.join().unwrap();
        stop.store(true, Ordering::SeqCst);
        (layer, plain, storm.join().unwrap())
    });
    assert!(layer.is_empty(), "{} failed: {layer:#?}", layer.len());
    assert!(ended > 0);
    let mut conn = pg::connect(&url);
    for w in 0..4 {
        let value = diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
            "SELECT value FROM counters WHERE name = 'w{w}'"
        ))
        .get_result::<i64>(&mut conn)
        .unwrap();
        assert_eq!(value, 30, "w{w}");
    }
    assert!(plain > 0, "plain Diesel never met an ended session");
}

/// A migration that cannot run in a transaction (`CREATE INDEX CONCURRENTLY`, held up by an
/// older transaction) while 6 more opens wait for the migration lock in autocommit; their
/// sessions are ended meanwhile. They wait on new sessions (they tried on the dead ones
/// until the deadline, and all failed), and the index is built once, valid.
#[test]
fn opens_waiting_for_a_migration_outside_a_transaction_outlive_their_sessions() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    common::migrations_dir(
        dir.path(),
        &[
            (
                "2026-12-01-000001_table",
                "CREATE TABLE t (v INT); INSERT INTO t SELECT generate_series(1, 1000);",
                true,
            ),
            (
                "2026-12-01-000002_index",
                "CREATE INDEX CONCURRENTLY t_v ON t (v);",
                false,
            ),
        ],
    );
    // An older transaction, with a snapshot, that the index build waits for.
    let mut older = pg::connect(&url);
    older
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT txid_current();")
        .unwrap();
    let opens: Vec<_> = (0..7)
        .map(|_| {
            let (url, path) = (url.clone(), dir.path().to_owned());
            std::thread::spawn(move || {
                options(Duration::from_secs(20)).open_postgres(
                    &url,
                    diesel_migrations::FileBasedMigrations::from_path(path).unwrap(),
                )
            })
        })
        .collect();
    let mut admin = pg::connect(&url);
    let building = pg::wait_until(Duration::from_secs(60), || {
        diesel::dsl::sql::<diesel::sql_types::BigInt>(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX CONCURRENTLY%'",
        )
        .get_result::<i64>(&mut admin)
        .unwrap()
            > 0
    });
    assert!(building, "the index build never started");
    // Every session of the database but the builder's, the older transaction's and this one.
    let ended = diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
         AND backend_type = 'client backend' AND state <> 'idle in transaction' \
         AND query NOT LIKE 'CREATE INDEX CONCURRENTLY%'",
    )
    .get_result::<i64>(&mut admin)
    .unwrap();
    assert!(ended > 0, "no waiting session to end");
    std::thread::sleep(Duration::from_millis(500));
    older.batch_execute("COMMIT").unwrap();
    let results: Vec<_> = opens
        .into_iter()
        .map(|open| within(Duration::from_secs(90), move || open.join().unwrap()))
        .collect();
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    let applied: usize = results
        .iter()
        .map(|r| r.as_ref().unwrap().applied_at_open().len())
        .sum();
    assert_eq!(applied, 2, "each migration applied once");
    let invalid = diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "SELECT count(*) FROM pg_index WHERE NOT indisvalid",
    )
    .get_result::<i64>(&mut admin)
    .unwrap();
    assert_eq!(invalid, 0);
}
