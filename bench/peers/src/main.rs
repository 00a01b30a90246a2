//! The peer benchmark's runner (issue 23, item 5): one job-queue write, the same in every
//! runner, through this crate, plain Diesel, deadpool-diesel and sqlx.
//!
//! The write, in one write transaction: read the counter (`SELECT value FROM counter WHERE
//! id = 1`), insert the job it numbers (`INSERT INTO jobs (seq, payload, writer, created_us)
//! VALUES (value + 1, ...)`, `seq` the primary key), store the new counter value. A lost
//! update would be a primary-key violation; `check` compares the counter, the number of jobs
//! and the writes acknowledged.
//!
//! ```text
//! peers-bench init  DB                                   the schema (this crate's migrations)
//! peers-bench run   RUNNER DB BARRIER WRITERS WRITES     WRITERS threads or tasks x WRITES
//! peers-bench check DB                                   {"counter":N,"jobs":N}
//! ```
//!
//! `run` prepares everything (handle, pool, runtime), announces `BARRIER.ready-<pid>`, waits
//! for `BARRIER` to exist (at most 120 s), then writes; it prints one JSON line: the writes
//! acknowledged, the failures (a failed write is counted and not retried here; each
//! runner's own retries, where it has any, are part of its write), the failures' messages
//! and the latency of every acknowledged write in microseconds, from the call to its
//! return (pool checkout included). Exit 0 after the writes, 2 if setup failed.
//!
//! Runners: `crate` (`Database::write`, OS threads), `crate-async` (`AsyncDatabase::write`,
//! tokio tasks), `diesel` (plain `SqliteConnection`, `immediate_transaction`, OS threads; an
//! r2d2 pool of WRITERS connections when WRITERS > 1), `deadpool-immediate` and
//! `deadpool-deferred` (deadpool-diesel, pool of 8, `interact` with `immediate_transaction`
//! or Diesel's deferred `transaction`), `sqlx` (pool of 8, `begin_with("BEGIN IMMEDIATE")`).
//! Every connection: WAL, `synchronous = NORMAL`; the peers `busy_timeout` 5 s; this crate
//! its defaults (busy_timeout 5 s, its retry policy and fair queue) with
//! `synchronous(Normal)` said explicitly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use diesel_migrations::{embed_migrations, EmbeddedMigrations};
use sqlite_persistence::{AsyncDatabase, Options, Synchronous};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// What every job carries: 64 bytes.
const PAYLOAD: &str = "{\"kind\":\"resize\",\"image\":\"img/0000-0000.png\",\"size\":[640,480]}xx";

/// The pragmas of every peer connection, `busy_timeout` first.
const PEER_PRAGMAS: &str =
    "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;";

/// The pool size a tokio user would give deadpool-diesel and sqlx.
const ASYNC_POOL: usize = 8;

diesel::table! {
    counter (id) {
        id -> BigInt,
        value -> BigInt,
    }
}

diesel::table! {
    jobs (seq) {
        seq -> BigInt,
        payload -> Text,
        writer -> Text,
        created_us -> BigInt,
    }
}

type Setup<T> = Result<T, String>;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The job-queue write, through Diesel (this crate, plain Diesel and deadpool-diesel).
fn job(conn: &mut SqliteConnection, writer: &str) -> QueryResult<i64> {
    let value: i64 = counter::table.find(1).select(counter::value).first(conn)?;
    let seq = value + 1;
    diesel::insert_into(jobs::table)
        .values((
            jobs::seq.eq(seq),
            jobs::payload.eq(PAYLOAD),
            jobs::writer.eq(writer),
            jobs::created_us.eq(now_us()),
        ))
        .execute(conn)?;
    diesel::update(counter::table.find(1))
        .set(counter::value.eq(seq))
        .execute(conn)?;
    Ok(seq)
}

/// The same write through sqlx, in a transaction begun with `BEGIN IMMEDIATE`.
async fn sqlx_job(pool: &sqlx::SqlitePool, writer: &str) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let value: i64 = sqlx::query_scalar("SELECT value FROM counter WHERE id = 1")
        .fetch_one(&mut *tx)
        .await?;
    let seq = value + 1;
    sqlx::query("INSERT INTO jobs (seq, payload, writer, created_us) VALUES (?1, ?2, ?3, ?4)")
        .bind(seq)
        .bind(PAYLOAD)
        .bind(writer)
        .bind(now_us())
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE counter SET value = ?1 WHERE id = 1")
        .bind(seq)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(seq)
}

/// What one writer (or a whole process) saw.
#[derive(Default)]
struct Record {
    latencies_us: Vec<u64>,
    failures: u64,
    errors: BTreeMap<String, u64>,
}

impl Record {
    fn note<T, E: std::fmt::Display>(&mut self, started: Instant, result: Result<T, E>) {
        let took = started.elapsed().as_micros() as u64;
        match result {
            Ok(_) => self.latencies_us.push(took),
            Err(error) => {
                self.failures += 1;
                let message: String = error.to_string().chars().take(120).collect();
                *self.errors.entry(message).or_default() += 1;
            }
        }
    }

    fn merge(&mut self, other: Record) {
        self.latencies_us.extend(other.latencies_us);
        self.failures += other.failures;
        for (message, n) in other.errors {
            *self.errors.entry(message).or_default() += n;
        }
    }

    fn json(&self, runner: &str, writers: usize) -> String {
        let errors: Vec<String> = self
            .errors
            .iter()
            .map(|(m, n)| format!("{}:{n}", quote(m)))
            .collect();
        let latencies: Vec<String> = self.latencies_us.iter().map(u64::to_string).collect();
        format!(
            "{{\"runner\":{},\"writers\":{writers},\"ok\":{},\"failures\":{},\"errors\":{{{}}},\"lat_us\":[{}]}}",
            quote(runner),
            self.latencies_us.len(),
            self.failures,
            errors.join(","),
            latencies.join(",")
        )
    }
}

fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Announces `BARRIER.ready-<pid>`, then waits for `BARRIER` (at most 120 s).
fn ready_and_wait(barrier: &Path) -> Setup<()> {
    let mut ready = barrier.as_os_str().to_owned();
    ready.push(format!(".ready-{}", std::process::id()));
    std::fs::write(&ready, b"").map_err(|e| format!("announce readiness: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !barrier.exists() {
        if Instant::now() > deadline {
            return Err("the barrier was not released within 120 s".into());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}

fn writer_name(w: usize) -> String {
    format!("{}-{w}", std::process::id())
}

/// WRITERS OS threads, each doing WRITES calls of `write`, released together.
fn threads<F>(writers: usize, writes: usize, write: F) -> Record
where
    F: Fn(&str, &mut Record) + Sync,
{
    let total = Mutex::new(Record::default());
    std::thread::scope(|s| {
        for w in 0..writers {
            let (write, total) = (&write, &total);
            s.spawn(move || {
                let name = writer_name(w);
                let mut record = Record::default();
                for _ in 0..writes {
                    write(&name, &mut record);
                }
                if let Ok(mut total) = total.lock() {
                    total.merge(record);
                }
            });
        }
    });
    total.into_inner().unwrap_or_default()
}

fn runtime() -> Setup<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

fn crate_options() -> Options {
    Options::new().synchronous(Synchronous::Normal)
}

fn run_crate(db: &Path, barrier: &Path, writers: usize, writes: usize) -> Setup<Record> {
    let db = crate_options()
        .open(db, MIGRATIONS)
        .map_err(|e| format!("open: {e}"))?;
    ready_and_wait(barrier)?;
    Ok(threads(writers, writes, |name, record| {
        let started = Instant::now();
        let result = db.write(|conn| -> sqlite_persistence::Result<i64> { Ok(job(conn, name)?) });
        record.note(started, result);
    }))
}

fn run_crate_async(db: &Path, barrier: &Path, writers: usize, writes: usize) -> Setup<Record> {
    let runtime = runtime()?;
    runtime.block_on(async {
        let db = AsyncDatabase::open_with(crate_options(), db.to_owned(), MIGRATIONS)
            .await
            .map_err(|e| format!("open: {e}"))?;
        ready_and_wait(barrier)?;
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..writers {
            let db = db.clone();
            tasks.spawn(async move {
                let name = writer_name(w);
                let mut record = Record::default();
                for _ in 0..writes {
                    let name = name.clone();
                    let started = Instant::now();
                    let result = db
                        .write(move |conn| -> sqlite_persistence::Result<i64> {
                            Ok(job(conn, &name)?)
                        })
                        .await;
                    record.note(started, result);
                }
                record
            });
        }
        collect(tasks).await
    })
}

async fn collect(mut tasks: tokio::task::JoinSet<Record>) -> Setup<Record> {
    let mut total = Record::default();
    while let Some(joined) = tasks.join_next().await {
        total.merge(joined.map_err(|e| format!("a writer task failed: {e}"))?);
    }
    Ok(total)
}

/// Plain Diesel's pragmas on every pooled connection.
#[derive(Debug)]
struct PeerPragmas;

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for PeerPragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(PEER_PRAGMAS)
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

fn run_diesel(db: &Path, barrier: &Path, writers: usize, writes: usize) -> Setup<Record> {
    let url = db.to_str().ok_or("the database path is not UTF-8")?;
    if writers == 1 {
        let mut conn = SqliteConnection::establish(url).map_err(|e| format!("establish: {e}"))?;
        conn.batch_execute(PEER_PRAGMAS)
            .map_err(|e| format!("pragmas: {e}"))?;
        ready_and_wait(barrier)?;
        let name = writer_name(0);
        let mut record = Record::default();
        for _ in 0..writes {
            let started = Instant::now();
            let result = conn.immediate_transaction(|conn| job(conn, &name));
            record.note(started, result);
        }
        return Ok(record);
    }
    let pool = Pool::builder()
        .max_size(writers as u32)
        .connection_customizer(Box::new(PeerPragmas))
        .build(ConnectionManager::<SqliteConnection>::new(url))
        .map_err(|e| format!("r2d2 pool: {e}"))?;
    ready_and_wait(barrier)?;
    Ok(threads(writers, writes, |name, record| {
        let started = Instant::now();
        let result = pool.get().map_err(|e| e.to_string()).and_then(|mut conn| {
            conn.immediate_transaction(|conn| job(conn, name))
                .map_err(|e| e.to_string())
        });
        record.note(started, result);
    }))
}

type DeadPool = deadpool_diesel::sqlite::Pool;

fn deadpool(db: &Path) -> Setup<DeadPool> {
    use deadpool_diesel::sqlite::{Hook, HookError, Manager, Runtime};
    let url = db.to_str().ok_or("the database path is not UTF-8")?;
    DeadPool::builder(Manager::new(url, Runtime::Tokio1))
        .max_size(ASYNC_POOL)
        .post_create(Hook::async_fn(|conn, _| {
            Box::pin(async move {
                conn.interact(|conn| conn.batch_execute(PEER_PRAGMAS))
                    .await
                    .map_err(|e| HookError::Message(e.to_string().into()))?
                    .map_err(|e| HookError::Message(e.to_string().into()))
            })
        }))
        .build()
        .map_err(|e| format!("deadpool: {e}"))
}

fn run_deadpool(
    immediate: bool,
    db: &Path,
    barrier: &Path,
    writers: usize,
    writes: usize,
) -> Setup<Record> {
    let runtime = runtime()?;
    runtime.block_on(async {
        let pool = deadpool(db)?;
        ready_and_wait(barrier)?;
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..writers {
            let pool = pool.clone();
            tasks.spawn(async move {
                let name = writer_name(w);
                let mut record = Record::default();
                for _ in 0..writes {
                    let name = name.clone();
                    let started = Instant::now();
                    let result = async {
                        let conn = pool.get().await.map_err(|e| e.to_string())?;
                        conn.interact(move |conn| {
                            if immediate {
                                conn.immediate_transaction(|conn| job(conn, &name))
                            } else {
                                conn.transaction(|conn| job(conn, &name))
                            }
                        })
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())
                    }
                    .await;
                    record.note(started, result);
                }
                record
            });
        }
        collect(tasks).await
    })
}

fn run_sqlx(db: &Path, barrier: &Path, writers: usize, writes: usize) -> Setup<Record> {
    use sqlx::sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
    };
    let runtime = runtime()?;
    runtime.block_on(async {
        let options = SqliteConnectOptions::new()
            .filename(db)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5))
            .synchronous(SqliteSynchronous::Normal);
        let pool = SqlitePoolOptions::new()
            .max_connections(ASYNC_POOL as u32)
            .connect_with(options)
            .await
            .map_err(|e| format!("sqlx pool: {e}"))?;
        ready_and_wait(barrier)?;
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..writers {
            let pool = pool.clone();
            tasks.spawn(async move {
                let name = writer_name(w);
                let mut record = Record::default();
                for _ in 0..writes {
                    let started = Instant::now();
                    let result = sqlx_job(&pool, &name).await;
                    record.note(started, result);
                }
                record
            });
        }
        let record = collect(tasks).await;
        pool.close().await;
        record
    })
}

fn init(db: &Path) -> Setup<String> {
    crate_options()
        .open(db, MIGRATIONS)
        .map_err(|e| format!("init: {e}"))?;
    Ok(String::new())
}

fn check(db: &Path) -> Setup<String> {
    let url = db.to_str().ok_or("the database path is not UTF-8")?;
    let mut conn = SqliteConnection::establish(url).map_err(|e| format!("establish: {e}"))?;
    let value: i64 = counter::table
        .find(1)
        .select(counter::value)
        .first(&mut conn)
        .map_err(|e| format!("counter: {e}"))?;
    let rows: i64 = jobs::table
        .count()
        .get_result(&mut conn)
        .map_err(|e| format!("jobs: {e}"))?;
    Ok(format!("{{\"counter\":{value},\"jobs\":{rows}}}"))
}

fn number(text: Option<&String>, what: &str) -> Setup<usize> {
    text.and_then(|t| usize::from_str(t).ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{what}: a positive number"))
}

fn main_result(args: &[String]) -> Setup<String> {
    const USAGE: &str =
        "usage: peers-bench init DB | check DB | run RUNNER DB BARRIER WRITERS WRITES";
    match args.first().map(String::as_str) {
        Some("init") if args.len() == 2 => init(Path::new(&args[1])),
        Some("check") if args.len() == 2 => check(Path::new(&args[1])),
        Some("run") if args.len() == 6 => {
            let runner = args[1].as_str();
            let db = PathBuf::from(&args[2]);
            let barrier = PathBuf::from(&args[3]);
            let writers = number(args.get(4), "WRITERS")?;
            let writes = number(args.get(5), "WRITES")?;
            let record = match runner {
                "crate" => run_crate(&db, &barrier, writers, writes),
                "crate-async" => run_crate_async(&db, &barrier, writers, writes),
                "diesel" => run_diesel(&db, &barrier, writers, writes),
                "deadpool-immediate" => run_deadpool(true, &db, &barrier, writers, writes),
                "deadpool-deferred" => run_deadpool(false, &db, &barrier, writers, writes),
                "sqlx" => run_sqlx(&db, &barrier, writers, writes),
                other => Err(format!("unknown runner {other:?}")),
            }?;
            Ok(record.json(runner, writers))
        }
        _ => Err(USAGE.into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match main_result(&args) {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("peers-bench: {message}");
            ExitCode::from(2)
        }
    }
}
