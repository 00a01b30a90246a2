//! PostgreSQL: the same contract as SQLite, against a real server (see `common::pg`), with
//! real OS processes started together on a barrier. Each guarantee has a test beside it
//! that shows the plain Diesel setup failing under the same load.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_migrations::{
    embed_migrations, EmbeddedMigrations, FileBasedMigrations, MigrationHarness,
};
use sqlite_persistence::{Error, Options, PgDatabase, RetryPolicy};

use common::pg;

/// The test schema on PostgreSQL.
const MIGRATIONS: EmbeddedMigrations = embed_migrations!("tests/pg_migrations");

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

/// Read-then-write on counter `name`: the lost update that plain READ COMMITTED lets
/// through, and that SERIALIZABLE turns into a retried conflict.
fn increment(conn: &mut PgConnection, name: &str) -> QueryResult<i64> {
    diesel::sql_query("INSERT INTO counters (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind::<Text, _>(name)
        .execute(conn)?;
    let value = diesel::sql_query("SELECT value FROM counters WHERE name = $1")
        .bind::<Text, _>(name)
        .get_result::<Value>(conn)?
        .value
        + 1;
    diesel::sql_query("UPDATE counters SET value = $2 WHERE name = $1")
        .bind::<Text, _>(name)
        .bind::<BigInt, _>(value)
        .execute(conn)?;
    diesel::sql_query("INSERT INTO events (counter, value) VALUES ($1, $2)")
        .bind::<Text, _>(name)
        .bind::<BigInt, _>(value)
        .execute(conn)?;
    Ok(value)
}

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
fn a_connection_lost_during_commit_is_an_unknown_outcome_never_run_again() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let db = PgDatabase::open(&url, MIGRATIONS).unwrap();
    // A deferred trigger fires at COMMIT and ends its own session there.
    pg::connect(&url)
        .batch_execute(
            "CREATE TABLE doomed (x INT);
             CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER die AFTER INSERT ON doomed
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION die();",
        )
        .unwrap();
    let mut runs = 0;
    let error = db
        .write(|conn| -> sqlite_persistence::Result<()> {
            runs += 1;
            conn.batch_execute("INSERT INTO doomed VALUES (1)")?;
            Ok(())
        })
        .unwrap_err();
    assert!(
        matches!(error, Error::CommitOutcomeUnknown { .. }),
        "{error:?}"
    );
    assert_eq!(runs, 1);
    assert!(error.hint().is_some());
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
    let mut foreign = pg::connect(&url);
    foreign
        .batch_execute("BEGIN; SELECT * FROM counters WHERE name = 'a' FOR UPDATE")
        .unwrap();
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
    assert!(*attempts >= 2, "{error}");
    assert!(*elapsed >= Duration::from_millis(1400), "{error}");
    assert!(waited < Duration::from_millis(2500), "{waited:?}");
    let text = common::chain(&error);
    assert!(text.contains("lock timeout"), "{text}");
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
    let mut foreign = pg::connect(&url);
    foreign
        .batch_execute("BEGIN; SELECT * FROM counters WHERE name = 'a' FOR UPDATE")
        .unwrap();
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

// ---------------------------------------------------------------------------------------
// Across processes: real OS processes of this test binary (the ignored `pg_child` test),
// started together on a barrier file.

/// What one child reported.
#[derive(Debug)]
struct Outcome {
    ok: bool,
    /// Migrations its open applied (layer), or 0.
    applied: u32,
    /// Attempts its writes took in all (layer), or writes that failed (plain).
    attempts: u32,
    line: String,
}

/// Starts `n` children with `env`, lets them go together once all are waiting at the
/// barrier, and collects what each reported.
fn run_together(n: usize, env: &[(&str, String)]) -> Vec<Outcome> {
    let dir = tempfile::tempdir().unwrap();
    let barrier = dir.path().join("go");
    let mut env = env.to_vec();
    env.push(("SP_BARRIER", barrier.display().to_string()));
    let children: Vec<_> = (0..n)
        .map(|_| common::child_role("pg_child", &env))
        .collect();
    let ready = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("ready-")
            })
            .count()
    };
    assert!(
        pg::wait_until(Duration::from_secs(60), || ready() == n),
        "only {} of {n} children reached the barrier",
        ready()
    );
    std::fs::write(&barrier, "").unwrap();
    children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = text
                .lines()
                .find(|l| l.starts_with("result "))
                .unwrap_or_else(|| panic!("a child reported nothing: {text}"))
                .to_owned();
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .map_or(0, |v| v.parse().unwrap())
            };
            Outcome {
                ok: line.starts_with("result ok"),
                applied: field("applied="),
                attempts: field("attempts="),
                line,
            }
        })
        .collect()
}

/// A child: waits at the barrier, runs `SP_PG_JOB` with the layer or plain Diesel
/// (`SP_PG_PLAIN=1`), and prints one `result` line.
#[test]
#[ignore = "a child role of the cross-process tests"]
fn pg_child() {
    let Ok(url) = std::env::var("SP_PG_URL") else {
        return;
    };
    common::exit_after(120);
    let barrier = std::path::PathBuf::from(std::env::var("SP_BARRIER").unwrap());
    let dir = barrier.parent().unwrap();
    std::fs::write(dir.join(format!("ready-{}", std::process::id())), "").unwrap();
    while !barrier.exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let plain = std::env::var("SP_PG_PLAIN").as_deref() == Ok("1");
    let count: u32 = std::env::var("SP_PG_COUNT").map_or(1, |c| c.parse().unwrap());
    let counter = std::env::var("SP_PG_COUNTER").unwrap_or_else(|_| "hot".into());
    let result = match std::env::var("SP_PG_DIR") {
        Ok(dir) => job(
            &url,
            plain,
            count,
            &counter,
            FileBasedMigrations::from_path(dir).unwrap(),
        ),
        Err(_) => job(&url, plain, count, &counter, MIGRATIONS),
    };
    match result {
        Ok((applied, attempts)) => println!("result ok applied={applied} attempts={attempts}"),
        Err(e) => println!("result err {}", e.replace('\n', " ")),
    }
}

/// Opens (migrating), then makes `count` increments of `counter`. Returns the migrations
/// applied and the attempts the writes took (layer), or the failed writes (plain).
fn job<S>(
    url: &str,
    plain: bool,
    count: u32,
    counter: &str,
    migrations: S,
) -> Result<(u32, u32), String>
where
    S: diesel::migration::MigrationSource<diesel::pg::Pg>,
{
    fn chain(e: &(dyn std::error::Error + 'static)) -> String {
        common::chain(e)
    }
    if plain {
        let mut conn = PgConnection::establish(url).map_err(|e| chain(&e))?;
        conn.run_pending_migrations(migrations)
            .map_err(|e| e.to_string())?;
        let mut failed = 0;
        let mut first = None;
        for _ in 0..count {
            if let Err(e) = conn.transaction(|conn| increment(conn, counter)) {
                failed += 1;
                first.get_or_insert(chain(&e));
            }
        }
        return match first {
            None => Ok((0, 0)),
            Some(e) => Err(format!("{failed} writes failed, the first: {e}")),
        };
    }
    let db = PgDatabase::open(url, migrations).map_err(|e| chain(&e))?;
    let mut attempts = 0;
    for _ in 0..count {
        let (_, stats) = db
            .write_measured(|conn| increment(conn, counter).map_err(Error::from))
            .map_err(|e| chain(&e))?;
        attempts += stats.attempts;
    }
    Ok((db.applied_at_open().len() as u32, attempts))
}

/// What a cross-process test checks afterwards: each migration recorded once, and every
/// acknowledged increment stored once (values 1..=n, no gap, no duplicate).
fn assert_consistent(url: &str, counter: &str, acknowledged: i64) {
    let mut conn = pg::connect(url);
    assert_eq!(
        strings(
            &mut conn,
            "SELECT version AS name FROM __diesel_schema_migrations ORDER BY 1"
        ),
        common::VERSIONS
    );
    let value = number(
        &mut conn,
        &format!("SELECT coalesce(max(value), 0) AS value FROM counters WHERE name = '{counter}'"),
    );
    let events = number(
        &mut conn,
        &format!("SELECT count(*) AS value FROM events WHERE counter = '{counter}'"),
    );
    assert_eq!((value, events), (acknowledged, acknowledged));
}

fn env(url: &str, plain: bool, count: u32) -> Vec<(&'static str, String)> {
    vec![
        ("SP_PG_URL", url.to_owned()),
        ("SP_PG_PLAIN", if plain { "1" } else { "0" }.to_owned()),
        ("SP_PG_COUNT", count.to_string()),
    ]
}

#[test]
fn a_cold_storm_of_64_processes_migrates_once_and_every_write_lands() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let outcomes = run_together(64, &env(&url, false, 1));
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.ok).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    // One process applied both migrations; every other found them applied.
    let mut applied: Vec<u32> = outcomes.iter().map(|o| o.applied).collect();
    applied.sort();
    assert_eq!(applied.iter().sum::<u32>(), 2, "{applied:?}");
    assert_consistent(&url, "hot", 64);
}

#[test]
fn plain_diesel_fails_in_the_same_cold_storm() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let outcomes = run_together(64, &env(&url, true, 1));
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.ok).collect();
    assert!(
        !failed.is_empty(),
        "no plain process failed: {:#?}",
        &outcomes[..3]
    );
    eprintln!(
        "plain: {} of 64 failed, e.g. {}",
        failed.len(),
        failed[0].line
    );
}

#[test]
fn conflicting_writers_are_retried_and_every_write_is_stored_once() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    PgDatabase::open(&url, MIGRATIONS).unwrap();
    let outcomes = run_together(8, &env(&url, false, 25));
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.ok).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    let attempts: u32 = outcomes.iter().map(|o| o.attempts).sum();
    eprintln!("8 x 25 conflicting writes took {attempts} attempts");
    // The conflicts happened, and were retried.
    assert!(attempts > 200, "{attempts}");
    assert_consistent(&url, "hot", 200);
}

#[test]
fn plain_diesel_loses_or_fails_conflicting_writes() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    PgDatabase::open(&url, MIGRATIONS).unwrap();
    let outcomes = run_together(8, &env(&url, true, 25));
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    let value = number(
        &mut pg::connect(&url),
        "SELECT coalesce(max(value), 0) AS value FROM counters WHERE name = 'hot'",
    );
    // Read-then-write in READ COMMITTED: two writers read the same value; one's update is
    // lost, or its event collides with the other's.
    assert!(
        failed > 0 || value < 200,
        "plain: {failed} failed, value {value}"
    );
    eprintln!(
        "plain: {failed} of 8 processes had failed writes; the counter reached {value} of 200"
    );
}

/// A migrations directory with `migrations` (name, up.sql, run_in_transaction).
fn migrations_dir(dir: &Path, migrations: &[(&str, &str, bool)]) {
    for (name, up, transactional) in migrations {
        let m = dir.join(name);
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("up.sql"), up).unwrap();
        std::fs::write(m.join("down.sql"), "SELECT 1;").unwrap();
        if !transactional {
            std::fs::write(m.join("metadata.toml"), "run_in_transaction = false\n").unwrap();
        }
    }
}

/// Whether a session of `url`'s database runs a statement containing `text`.
fn running(url: &str, text: &str) -> bool {
    number(
        &mut pg::connect(url),
        &format!(
            "SELECT count(*) AS value FROM pg_stat_activity \
             WHERE datname = current_database() AND state = 'active' \
             AND query LIKE '%{text}%' AND query NOT LIKE '%pg_stat_activity%'"
        ),
    ) > 0
}

/// Starts one child migrating `dir`, waits until it runs the slow migration, kills it with
/// SIGKILL, and returns once it is gone.
fn kill_mid_batch(url: &str, dir: &Path, plain: bool) {
    let barrier_dir = tempfile::tempdir().unwrap();
    let barrier = barrier_dir.path().join("go");
    std::fs::write(&barrier, "").unwrap();
    let mut vars = env(url, plain, 0);
    vars.push(("SP_PG_DIR", dir.display().to_string()));
    vars.push(("SP_BARRIER", barrier.display().to_string()));
    let mut child = common::child_role("pg_child", &vars);
    assert!(
        pg::wait_until(Duration::from_secs(30), || running(url, "pg_sleep")),
        "the migration never started"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

const SLOW_BATCH: [(&str, &str, bool); 2] = [
    (
        "2026-12-01-000001_first",
        "CREATE TABLE first_table (x INT);",
        true,
    ),
    (
        "2026-12-01-000002_slow",
        "CREATE TABLE second_table (x INT); SELECT pg_sleep(2);",
        true,
    ),
];

#[test]
fn a_migrating_process_killed_mid_batch_leaves_nothing_half_applied() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    migrations_dir(dir.path(), &SLOW_BATCH);
    kill_mid_batch(&url, dir.path(), false);
    let mut conn = pg::connect(&url);
    let tables =
        "SELECT tablename::text AS name FROM pg_tables WHERE schemaname = 'public' ORDER BY 1";
    // The batch is one transaction: nothing of it is visible, not even its bookkeeping.
    assert!(
        strings(&mut conn, tables).is_empty(),
        "{:?}",
        strings(&mut conn, tables)
    );
    // The next start waits for the dead session's lock (its backend ends after the sleep)
    // and completes the batch.
    let db = PgDatabase::open(&url, FileBasedMigrations::from_path(dir.path()).unwrap()).unwrap();
    assert_eq!(db.applied_at_open().len(), 2);
    assert_eq!(
        strings(&mut conn, tables),
        [
            "__diesel_schema_migrations",
            "__sqlite_persistence_checksums",
            "first_table",
            "second_table"
        ]
    );
}

#[test]
fn plain_diesel_killed_mid_batch_leaves_it_half_applied() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    migrations_dir(dir.path(), &SLOW_BATCH);
    kill_mid_batch(&url, dir.path(), true);
    let mut conn = pg::connect(&url);
    // Diesel commits each migration on its own: the first is applied and recorded, the
    // second not.
    assert!(pg::wait_until(Duration::from_secs(10), || !running(
        &url, "pg_sleep"
    )));
    assert_eq!(
        strings(
            &mut conn,
            "SELECT version AS name FROM __diesel_schema_migrations"
        ),
        ["20261201000001"]
    );
}

/// A table big enough that `CREATE INDEX CONCURRENTLY` takes a while, then the index.
const CONCURRENT_INDEX: [(&str, &str, bool); 2] = [
    (
        "2026-12-01-000001_big",
        "CREATE TABLE big (x INT); INSERT INTO big SELECT g FROM generate_series(1, 300000) g;",
        true,
    ),
    (
        "2026-12-01-000002_index",
        "CREATE INDEX CONCURRENTLY big_x ON big (x);",
        false,
    ),
];

#[test]
fn a_concurrent_index_migration_racing_16_waiting_processes_never_deadlocks() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    migrations_dir(dir.path(), &CONCURRENT_INDEX);
    let mut vars = env(&url, false, 0);
    vars.push(("SP_PG_DIR", dir.path().display().to_string()));
    let outcomes = run_together(16, &vars);
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.ok).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(outcomes.iter().map(|o| o.applied).sum::<u32>(), 2);
    let mut conn = pg::connect(&url);
    // The index is there and valid.
    assert_eq!(
        number(
            &mut conn,
            "SELECT count(*) AS value FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = 'big_x' AND i.indisvalid"
        ),
        1
    );
}

#[test]
fn waiting_for_the_migration_lock_inside_a_transaction_deadlocks_with_a_concurrent_index() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let mut holder = pg::connect(&url);
    holder
        .batch_execute(
            "CREATE TABLE big (x INT); INSERT INTO big SELECT g FROM generate_series(1, 300000) g;
             SELECT pg_advisory_lock(1, 2);",
        )
        .unwrap();
    // The waiter of a migrator that locks inside its transaction (as a plain setup with
    // pg_advisory_xact_lock would): its snapshot is older than the index.
    let waiter_url = url.clone();
    let waiter = std::thread::spawn(move || {
        let mut conn = pg::connect(&waiter_url);
        conn.batch_execute("BEGIN; SELECT 1;").unwrap();
        let result = conn.batch_execute("SELECT pg_advisory_xact_lock(1, 2)");
        let _ = conn.batch_execute("ROLLBACK");
        result
    });
    assert!(pg::wait_until(Duration::from_secs(10), || running(
        &url,
        "pg_advisory_xact_lock"
    )));
    let index = holder.batch_execute("CREATE INDEX CONCURRENTLY big_x ON big (x)");
    let _ = holder.batch_execute("SELECT pg_advisory_unlock(1, 2)");
    let waited = waiter.join().unwrap();
    let deadlock = [index.as_ref().err(), waited.as_ref().err()]
        .into_iter()
        .flatten()
        .any(|e| e.to_string().contains("deadlock detected"));
    assert!(deadlock, "index: {index:?}, waiter: {waited:?}");
}
