//! The cross-process suite, run on both engines: real OS processes of this test binary
//! started together on a barrier file, against a SQLite file and against a PostgreSQL
//! database (a real server, see `common::pg`). Each guarantee has a test beside it that shows
//! the plain Diesel setup of the same engine failing under the same load.
//!
//! The schema is the library's test schema (`migrations/`), which both engines run; each
//! scenario opens the database by URL (`Options::open_url`), so the engine is chosen by the
//! scheme alone.

mod common;

use std::path::Path;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_migrations::{FileBasedMigrations, MigrationHarness};
use sqlite_persistence::{AnyConnection, Engine, Error, HeldLock, Options, Status};

use common::schema::{counters, events};
use common::{pg, MIGRATIONS};

/// Defines `$name`: a read-then-write of counter `name` on a `$conn` (the lost update that a
/// plain deferred or `READ COMMITTED` transaction lets through), and its event; a
/// millisecond of work between the read and the write.
macro_rules! increment_on {
    ($name:ident, $conn:ty) => {
        fn $name(conn: &mut $conn, name: &str) -> QueryResult<i64> {
            let value: i64 = counters::table
                .find(name)
                .select(counters::value)
                .first(conn)
                .optional()?
                .unwrap_or(0);
            std::thread::sleep(Duration::from_millis(1));
            diesel::insert_into(counters::table)
                .values((counters::name.eq(name), counters::value.eq(value + 1)))
                .on_conflict(counters::name)
                .do_update()
                .set(counters::value.eq(value + 1))
                .execute(conn)?;
            diesel::insert_into(events::table)
                .values((events::counter.eq(name), events::value.eq(value + 1)))
                .execute(conn)?;
            Ok(value + 1)
        }
    };
}
increment_on!(increment_sqlite, SqliteConnection);
increment_on!(increment_pg, PgConnection);

fn increment(conn: AnyConnection<'_>, name: &str) -> QueryResult<i64> {
    match conn {
        AnyConnection::Sqlite(conn) => increment_sqlite(conn, name),
        AnyConnection::Postgres(conn) => increment_pg(conn, name),
        _ => unreachable!("this build has two engines"),
    }
}

/// A fresh database of `engine`: its URL, and the directory that holds a SQLite file.
struct Fresh {
    url: String,
    _dir: Option<tempfile::TempDir>,
}

fn fresh(engine: Engine) -> Option<Fresh> {
    match engine {
        Engine::Postgres => Some(Fresh {
            url: pg::fresh_database()?,
            _dir: None,
        }),
        _ => {
            let (dir, path) = common::fresh_db();
            Some(Fresh {
                url: format!("sqlite://{}", path.display()),
                _dir: Some(dir),
            })
        }
    }
}

#[derive(QueryableByName)]
struct Value {
    #[diesel(sql_type = BigInt)]
    value: i64,
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

/// A plain connection of the engine `url` names, for checking.
enum Plain {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl Plain {
    fn open(url: &str) -> Plain {
        match url.strip_prefix("sqlite://") {
            Some(path) => Plain::Sqlite(common::plain_sqlite(path)),
            None => Plain::Postgres(pg::connect(url)),
        }
    }

    fn number(&mut self, sql: &str) -> i64 {
        match self {
            Plain::Sqlite(c) => diesel::sql_query(sql).get_result::<Value>(c),
            Plain::Postgres(c) => diesel::sql_query(sql).get_result::<Value>(c),
        }
        .unwrap()
        .value
    }

    fn strings(&mut self, sql: &str) -> Vec<String> {
        match self {
            Plain::Sqlite(c) => diesel::sql_query(sql).load::<Name>(c),
            Plain::Postgres(c) => diesel::sql_query(sql).load::<Name>(c),
        }
        .unwrap()
        .into_iter()
        .map(|row| row.name)
        .collect()
    }

    /// The user tables, by name.
    fn tables(&mut self) -> Vec<String> {
        let sql = match self {
            Plain::Sqlite(_) => {
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%' \
                 ORDER BY 1"
            }
            Plain::Postgres(_) => {
                "SELECT tablename::text AS name FROM pg_tables WHERE schemaname = 'public' \
                 ORDER BY 1"
            }
        };
        self.strings(sql)
    }
}

/// What one child reported.
#[derive(Debug)]
struct Outcome {
    ok: bool,
    /// Migrations its open applied (layer), or 0.
    applied: u32,
    /// Attempts its writes took in all (layer).
    attempts: u32,
    line: String,
}

fn env(url: &str, plain: bool, count: u32) -> Vec<(&'static str, String)> {
    vec![
        ("SP_URL", url.to_owned()),
        ("SP_PLAIN", if plain { "1" } else { "0" }.to_owned()),
        ("SP_COUNT", count.to_string()),
    ]
}

/// Starts `n` children with `env`, lets them go together once all are waiting at the
/// barrier, and collects what each reported.
fn run_together(n: usize, env: &[(&str, String)]) -> Vec<Outcome> {
    let dir = tempfile::tempdir().unwrap();
    let barrier = dir.path().join("go");
    let mut env = env.to_vec();
    env.push(("SP_BARRIER", barrier.display().to_string()));
    let children: Vec<_> = (0..n)
        .map(|_| common::child_role("engine_child", &env))
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

/// A child: waits at the barrier, opens `SP_URL` (migrating `SP_DIR`'s migrations, or the
/// test schema) with the layer or the plain setup (`SP_PLAIN=1`), makes `SP_COUNT`
/// increments of counter `hot`, and prints one `result` line.
#[test]
#[ignore = "a child role of the cross-process tests"]
fn engine_child() {
    let Ok(url) = std::env::var("SP_URL") else {
        return;
    };
    common::exit_after(120);
    let barrier = std::path::PathBuf::from(std::env::var("SP_BARRIER").unwrap());
    let dir = barrier.parent().unwrap();
    std::fs::write(dir.join(format!("ready-{}", std::process::id())), "").unwrap();
    while !barrier.exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let plain = std::env::var("SP_PLAIN").as_deref() == Ok("1");
    let count: u32 = std::env::var("SP_COUNT").map_or(1, |c| c.parse().unwrap());
    let result = match std::env::var("SP_DIR") {
        Ok(dir) => job(
            &url,
            plain,
            count,
            FileBasedMigrations::from_path(dir).unwrap(),
        ),
        Err(_) => job(&url, plain, count, MIGRATIONS),
    };
    match result {
        Ok((applied, attempts)) => println!("result ok applied={applied} attempts={attempts}"),
        Err(e) => println!("result err {}", e.replace('\n', " ")),
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    common::chain(e)
}

/// Opens (migrating), then makes `count` increments. Returns the migrations applied and the
/// attempts the writes took (layer; 0 and 0 for the plain setup).
fn job<S: sqlite_persistence::AnyMigrations>(
    url: &str,
    plain: bool,
    count: u32,
    migrations: S,
) -> Result<(u32, u32), String> {
    if plain {
        return plain_job(url, count, migrations);
    }
    let db = Options::new()
        .open_url(url, migrations)
        .map_err(|e| chain(&e))?;
    let mut attempts = 0;
    for _ in 0..count {
        let (_, stats) = db
            .write_measured(|conn| increment(conn, "hot").map_err(Error::from))
            .map_err(|e| chain(&e))?;
        attempts += stats.attempts;
    }
    Ok((db.applied_at_open().len() as u32, attempts))
}

/// The setup most Diesel applications write, for each engine: SQLite with `busy_timeout`
/// and WAL, PostgreSQL as it comes; `run_pending_migrations`; Diesel's default transaction
/// (deferred on SQLite, `READ COMMITTED` on PostgreSQL) for the read-then-write; no retry.
fn plain_job<S: sqlite_persistence::AnyMigrations>(
    url: &str,
    count: u32,
    migrations: S,
) -> Result<(u32, u32), String> {
    fn writes<C: Connection>(
        conn: &mut C,
        count: u32,
        mut increment: impl FnMut(&mut C) -> QueryResult<i64>,
    ) -> Result<(u32, u32), String> {
        for _ in 0..count {
            conn.transaction(&mut increment).map_err(|e| chain(&e))?;
        }
        Ok((0, 0))
    }
    match url.strip_prefix("sqlite://") {
        Some(path) => {
            let mut conn = SqliteConnection::establish(path).map_err(|e| chain(&e))?;
            conn.batch_execute("PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL;")
                .map_err(|e| chain(&e))?;
            conn.run_pending_migrations(migrations)
                .map_err(|e| e.to_string())?;
            writes(&mut conn, count, |c| increment_sqlite(c, "hot"))
        }
        None => {
            let mut conn = PgConnection::establish(url).map_err(|e| chain(&e))?;
            conn.run_pending_migrations(migrations)
                .map_err(|e| e.to_string())?;
            writes(&mut conn, count, |c| increment_pg(c, "hot"))
        }
    }
}

/// Each migration recorded once, and every acknowledged increment stored once (values
/// 1..=n, no gap, no duplicate).
fn assert_consistent(url: &str, acknowledged: i64) {
    let mut conn = Plain::open(url);
    assert_eq!(
        conn.strings("SELECT version AS name FROM __diesel_schema_migrations ORDER BY 1"),
        common::VERSIONS
    );
    let value =
        conn.number("SELECT coalesce(max(value), 0) AS value FROM counters WHERE name = 'hot'");
    let events = conn.number("SELECT count(*) AS value FROM events WHERE counter = 'hot'");
    assert_eq!((value, events), (acknowledged, acknowledged));
}

/// Runs `$body` (a function of an engine) as one test per engine.
macro_rules! on_both_engines {
    ($(#[$attr:meta])* $name:ident, $body:expr) => {
        mod $name {
            use super::*;

            #[test]
            $(#[$attr])*
            fn sqlite() {
                $body(Engine::Sqlite)
            }

            #[test]
            $(#[$attr])*
            fn postgres() {
                $body(Engine::Postgres)
            }
        }
    };
}

on_both_engines!(
    a_cold_storm_of_64_processes_migrates_once_and_every_write_lands,
    |engine| {
        let Some(db) = fresh(engine) else { return };
        let outcomes = run_together(64, &env(&db.url, false, 1));
        let failed: Vec<_> = outcomes.iter().filter(|o| !o.ok).collect();
        assert!(failed.is_empty(), "{failed:#?}");
        // One process applied both migrations; every other found them applied.
        assert_eq!(outcomes.iter().map(|o| o.applied).sum::<u32>(), 2);
        assert_consistent(&db.url, 64);
    }
);

on_both_engines!(plain_diesel_fails_in_the_same_cold_storm, |engine| {
    let Some(db) = fresh(engine) else { return };
    let outcomes = run_together(64, &env(&db.url, true, 1));
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.ok).collect();
    assert!(!failed.is_empty(), "no plain process failed");
    eprintln!(
        "{engine:?} plain: {} of 64 failed, e.g. {}",
        failed.len(),
        failed[0].line
    );
});

on_both_engines!(
    conflicting_writers_are_retried_and_every_write_is_stored_once,
    |engine| {
        let Some(db) = fresh(engine) else { return };
        Options::new().open_url(&db.url, MIGRATIONS).unwrap();
        let outcomes = run_together(8, &env(&db.url, false, 25));
        let failed: Vec<_> = outcomes.iter().filter(|o| !o.ok).collect();
        assert!(failed.is_empty(), "{failed:#?}");
        let attempts: u32 = outcomes.iter().map(|o| o.attempts).sum();
        eprintln!("{engine:?}: 8 x 25 conflicting writes took {attempts} attempts");
        assert_consistent(&db.url, 200);
    }
);

on_both_engines!(plain_diesel_loses_or_fails_conflicting_writes, |engine| {
    let Some(db) = fresh(engine) else { return };
    Options::new().open_url(&db.url, MIGRATIONS).unwrap();
    let outcomes = run_together(8, &env(&db.url, true, 25));
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    let value = Plain::open(&db.url)
        .number("SELECT coalesce(max(value), 0) AS value FROM counters WHERE name = 'hot'");
    // Read-then-write in a deferred (SQLite: "database is locked" at the write) or READ
    // COMMITTED (PostgreSQL: a lost update, or two events claiming one value) transaction.
    assert!(
        failed > 0 || value < 200,
        "plain: {failed} failed, value {value}"
    );
    eprintln!(
        "{engine:?} plain: {failed} of 8 processes failed; the counter reached {value} of 200"
    );
});

use common::migrations_dir;

/// Two migrations, the second slow: a sleep on PostgreSQL, a long count on SQLite (which
/// holds the write lock all along inside the layer's batch).
fn slow_batch(engine: Engine) -> [(&'static str, &'static str, bool); 2] {
    let slow = match engine {
        Engine::Postgres => "CREATE TABLE second_table (x INT); SELECT pg_sleep(2);",
        _ => {
            "CREATE TABLE second_table (x INT); WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL \
             SELECT x + 1 FROM c WHERE x < 30000000) SELECT count(*) FROM c;"
        }
    };
    [
        (
            "2026-12-01-000001_first",
            "CREATE TABLE first_table (x INT);",
            true,
        ),
        ("2026-12-01-000002_slow", slow, true),
    ]
}

/// Whether a session of `url`'s database runs a statement containing `text`.
fn running(url: &str, text: &str) -> bool {
    Plain::open(url).number(&format!(
        "SELECT count(*) AS value FROM pg_stat_activity \
         WHERE datname = current_database() AND state = 'active' \
         AND query LIKE '%{text}%' AND query NOT LIKE '%pg_stat_activity%'"
    )) > 0
}

/// Whether the process `pid` runs the slow migration of `url`: on PostgreSQL, its session
/// runs the sleep; on SQLite, the layer's batch holds the write lock, or the plain setup has
/// committed the first migration.
fn in_slow_migration(url: &str, pid: u32, plain: bool) -> bool {
    match url.strip_prefix("sqlite://") {
        None => running(url, "pg_sleep"),
        Some(_) if plain => Plain::open(url)
            .tables()
            .contains(&"first_table".to_owned()),
        // A new database is migrated under a private name, then linked into place.
        Some(path) => {
            let private = Path::new(path).with_file_name(format!(
                ".{}.init",
                Path::new(path).file_name().unwrap().to_str().unwrap()
            ));
            [Path::new(path), &private].iter().any(|file| {
                Status::read(file, MIGRATIONS, &Options::new()).is_ok_and(|status| {
                    status
                        .holders
                        .iter()
                        .any(|h| h.pid == pid && h.lock == HeldLock::WriteLock)
                })
            })
        }
    }
}

/// Starts one child migrating `dir`, waits until it runs the slow migration, and kills it
/// with SIGKILL.
fn kill_mid_batch(url: &str, dir: &Path, plain: bool) {
    let barrier_dir = tempfile::tempdir().unwrap();
    let barrier = barrier_dir.path().join("go");
    std::fs::write(&barrier, "").unwrap();
    let mut vars = env(url, plain, 0);
    vars.push(("SP_DIR", dir.display().to_string()));
    vars.push(("SP_BARRIER", barrier.display().to_string()));
    let mut child = common::child_role("engine_child", &vars);
    let pid = child.id();
    assert!(
        pg::wait_until(Duration::from_secs(30), || in_slow_migration(
            url, pid, plain
        )),
        "the migration never started"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

on_both_engines!(
    a_migrating_process_killed_mid_batch_leaves_nothing_half_applied,
    |engine| {
        let Some(db) = fresh(engine) else { return };
        let dir = tempfile::tempdir().unwrap();
        migrations_dir(dir.path(), &slow_batch(engine));
        kill_mid_batch(&db.url, dir.path(), false);
        // The batch is one transaction: nothing of it is visible, not even its bookkeeping.
        let tables = Plain::open(&db.url).tables();
        assert!(tables.is_empty(), "{tables:?}");
        // The next start (on PostgreSQL after the dead session's lock goes, when its backend
        // ends after the sleep) completes the batch.
        let opened = Options::new()
            .open_url(&db.url, FileBasedMigrations::from_path(dir.path()).unwrap())
            .unwrap();
        assert_eq!(opened.applied_at_open().len(), 2);
        let tables = Plain::open(&db.url).tables();
        for table in ["__diesel_schema_migrations", "first_table", "second_table"] {
            assert!(tables.contains(&table.to_owned()), "{tables:?}");
        }
        // What the killed maker of the new file left beside it is gone.
        if let Some(path) = db.url.strip_prefix("sqlite://") {
            let dir = Path::new(path).parent().unwrap();
            let left = common::file_names(dir);
            assert!(!left.iter().any(|name| name.contains(".init")), "{left:?}");
        }
    }
);

on_both_engines!(
    plain_diesel_killed_mid_batch_leaves_it_half_applied,
    |engine| {
        let Some(db) = fresh(engine) else { return };
        let dir = tempfile::tempdir().unwrap();
        migrations_dir(dir.path(), &slow_batch(engine));
        kill_mid_batch(&db.url, dir.path(), true);
        if engine == Engine::Postgres {
            assert!(pg::wait_until(Duration::from_secs(10), || !running(
                &db.url, "pg_sleep"
            )));
        }
        // Diesel commits each migration on its own: the first is applied and recorded, the
        // second not.
        assert_eq!(
            Plain::open(&db.url).strings("SELECT version AS name FROM __diesel_schema_migrations"),
            ["20261201000001"]
        );
    }
);

on_both_engines!(
    an_open_waits_for_another_process_migrating_past_its_retry_deadline,
    |engine| {
        let Some(db) = fresh(engine) else { return };
        let dir = tempfile::tempdir().unwrap();
        migrations_dir(dir.path(), &slow_batch(engine));
        // First a new database (SQLite: its maker holds the directory's turn), then one
        // that exists (SQLite: the batch's process holds the write queue, and says so).
        for (applied, slow) in [(2, None), (1, Some("2026-12-01-000003_slow"))] {
            if let Some(name) = slow {
                let [_, (_, body, _)] = slow_batch(engine);
                migrations_dir(
                    dir.path(),
                    &[(name, &body.replace("second", "third"), true)],
                );
            }
            let barrier_dir = tempfile::tempdir().unwrap();
            let barrier = barrier_dir.path().join("go");
            std::fs::write(&barrier, "").unwrap();
            let mut vars = env(&db.url, false, 0);
            vars.push(("SP_DIR", dir.path().display().to_string()));
            vars.push(("SP_BARRIER", barrier.display().to_string()));
            let child = common::child_role("engine_child", &vars);
            let pid = child.id();
            let migrating = || match (engine, slow) {
                // The child holds the write queue's flock on `<database>-lock`.
                (Engine::Sqlite, Some(_)) => {
                    use std::os::unix::fs::MetadataExt;
                    let lock = format!("{}-lock", db.url.strip_prefix("sqlite://").unwrap());
                    std::fs::metadata(lock).is_ok_and(|m| {
                        std::fs::read_to_string("/proc/locks")
                            .unwrap_or_default()
                            .lines()
                            .any(|l| {
                                l.contains("FLOCK")
                                    && l.contains(&format!(" {pid} "))
                                    && l.contains(&format!(":{} ", m.ino()))
                            })
                    })
                }
                _ => in_slow_migration(&db.url, pid, false),
            };
            assert!(
                pg::wait_until(Duration::from_secs(30), migrating),
                "the migration never started"
            );
            // A retry deadline far shorter than the batch: the open waits while the other
            // process migrates (it gave up as Busy at its deadline), and applies nothing.
            let opened = Options::new()
                .retry(
                    sqlite_persistence::RetryPolicy::new().max_elapsed(Duration::from_millis(300)),
                )
                .open_url(&db.url, FileBasedMigrations::from_path(dir.path()).unwrap())
                .unwrap();
            assert!(opened.applied_at_open().is_empty());
            let out = child.wait_with_output().unwrap();
            assert!(
                String::from_utf8_lossy(&out.stdout)
                    .contains(&format!("result ok applied={applied}")),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
);

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

/// PostgreSQL only: SQLite refuses a migration that cannot run in the batch's transaction
/// (`tests/migrations.rs`).
#[test]
fn a_concurrent_index_migration_racing_16_waiting_processes_never_deadlocks() {
    let Some(url) = pg::fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    migrations_dir(dir.path(), &CONCURRENT_INDEX);
    let mut vars = env(&url, false, 0);
    vars.push(("SP_DIR", dir.path().display().to_string()));
    let outcomes = run_together(16, &vars);
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.ok).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(outcomes.iter().map(|o| o.applied).sum::<u32>(), 2);
    // The index is there and valid.
    assert_eq!(
        Plain::open(&url).number(
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

/// PostgreSQL: an open that waits for another process's migration batch past its deadline
/// gives up with the typed error, naming the process's server session that holds the lock;
/// one with time enough waits for it and finds everything applied.
#[test]
fn a_migration_lock_held_past_the_deadline_names_its_holder() {
    let Some(db) = fresh(Engine::Postgres) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    migrations_dir(dir.path(), &slow_batch(Engine::Postgres));
    let barrier_dir = tempfile::tempdir().unwrap();
    let barrier = barrier_dir.path().join("go");
    std::fs::write(&barrier, "").unwrap();
    let mut vars = env(&db.url, false, 0);
    vars.push(("SP_DIR", dir.path().display().to_string()));
    vars.push(("SP_BARRIER", barrier.display().to_string()));
    let child = common::child_role("engine_child", &vars);
    assert!(
        pg::wait_until(Duration::from_secs(30), || running(&db.url, "pg_sleep")),
        "the migration never started"
    );
    let holder_pid = Plain::open(&db.url).number(
        "SELECT pid::bigint AS value FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE '%pg_sleep%' \
         AND query NOT LIKE '%pg_stat_activity%'",
    );
    let source = || FileBasedMigrations::from_path(dir.path()).unwrap();
    // Without a migration wait, the deadline ends it.
    let error = Options::new()
        .retry(sqlite_persistence::RetryPolicy::new().max_elapsed(Duration::from_millis(500)))
        .migration_wait(Duration::ZERO)
        .open_url(&db.url, source())
        .unwrap_err();
    let Error::Busy { holders, .. } = &error else {
        panic!("{error:?}")
    };
    assert!(
        holders
            .iter()
            .any(|h| i64::from(h.pid) == holder_pid && h.lock == HeldLock::MigrationLock),
        "{error}"
    );
    // With the default migration wait, the next open waits for the batch past its retry
    // deadline, and applies nothing.
    let opened = Options::new()
        .retry(sqlite_persistence::RetryPolicy::new().max_elapsed(Duration::from_millis(500)))
        .open_url(&db.url, source())
        .unwrap();
    assert!(opened.applied_at_open().is_empty());
    let out = child.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("result ok applied=2"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
