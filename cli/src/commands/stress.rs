//! `sqlite-persistence stress`: N real processes of this binary record K versions each on a
//! fresh database, started together; the report says whether this filesystem and this load
//! are safe, and (with `--compare`) how the plain Diesel setup fares under the same load.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::commands::{clean_or_error, on_fresh_db, plain_path};
use crate::error::Error;
use crate::harness::children::{remove_side_files, run_together};
use crate::harness::table::{self, Column};
use diesel::prelude::*;
use diesel::sql_types::BigInt;

/// The workload.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// How many processes start together.
    pub processes: usize,
    /// How many versions each records.
    pub writes: u32,
    /// How long each write transaction holds the lock.
    pub hold_ms: u64,
    /// Whether this crate's side queues its writers (`--no-fair-queue` turns it off).
    pub fair_queue: bool,
}

/// What one side of the run measured.
#[derive(Debug, Default)]
pub struct Report {
    /// The side's name.
    pub label: &'static str,
    /// Processes that exited with an error.
    pub failed: usize,
    /// Their errors, counted.
    pub causes: BTreeMap<String, usize>,
    /// The hints they printed with their errors, each once.
    pub hints: BTreeSet<String>,
    /// Versions the processes printed after their commit.
    pub acknowledged: usize,
    /// Version rows in the file.
    pub stored: i64,
    /// Whether the stored versions are 1..=n, each once.
    pub distinct_gapless: bool,
    /// Rows in `__diesel_schema_migrations`.
    pub migrations: i64,
    /// Each process's time from start to the database opened and migrated, sorted.
    pub ready_ms: Vec<f64>,
    /// Each write's wait for the write lock, sorted.
    pub wait_ms: Vec<f64>,
    /// From the release of the barrier to the last exit.
    pub seconds: f64,
}

/// `stress`: the crate's side on a fresh file, and with `--compare` the plain side on
/// `PATH-plain`.
pub fn run(db: Option<PathBuf>, load: Load, compare: bool, json: bool) -> Result<(), Error> {
    if load.processes == 0 || load.writes == 0 {
        return Err(Error::Usage {
            what: "stress load",
            reason: "--processes and --writes must be at least 1".to_owned(),
        });
    }
    #[cfg(feature = "postgres")]
    let server = match &db {
        Some(db) => crate::commands::postgres_url(db)?,
        None => None,
    };
    #[cfg(not(feature = "postgres"))]
    let server: Option<String> = None;
    let reports = match server {
        #[cfg(feature = "postgres")]
        Some(url) => on_fresh_server_databases(&url, load, compare)?,
        _ => on_fresh_db(db, "stress", |db| {
            let mut reports = vec![run_side("sqlite-persistence", db, load, false)?];
            if compare {
                reports.push(run_side("plain diesel", &plain_path(db), load, true)?);
            }
            Ok(reports)
        })?,
    };
    if json {
        let sides: Vec<_> = reports.iter().map(|r| r.json(load)).collect();
        crate::outln!(
            "{}",
            serde_json::json!({ "load": {
            "processes": load.processes, "writes": load.writes, "hold_ms": load.hold_ms,
        }, "sides": sides })
        )?;
    } else {
        print_table(load, &reports)?;
    }
    clean_or_error("stress", reports[0].clean(load))
}

/// The longest a side may run before its processes are killed.
const LIMIT: Duration = Duration::from_secs(300);

/// The PostgreSQL side of `stress`: fresh databases on the server of `url` (one per side,
/// dropped afterwards; the database `url` names is never touched).
#[cfg(feature = "postgres")]
fn on_fresh_server_databases(url: &str, load: Load, compare: bool) -> Result<Vec<Report>, Error> {
    crate::harness::interrupt::catch();
    let fresh = crate::pg::FreshDatabases::create(url, "stress", if compare { 2 } else { 1 })?;
    let dir = crate::commands::private_temp_dir("stress")?;
    let urls = fresh.urls();
    let result = (|| {
        let run = |label, url: &String, plain| {
            let report = run_side_in(label, Path::new(url), Some(&dir), load, plain)?;
            Ok::<_, Error>(report)
        };
        let mut reports = vec![run("sqlite-persistence", &urls[0], false)?];
        if compare {
            reports.push(run("plain diesel", &urls[1], true)?);
        }
        Ok(reports)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Runs `load` against a fresh database at `db` with this binary (`plain` for the baseline).
pub fn run_side(label: &'static str, db: &Path, load: Load, plain: bool) -> Result<Report, Error> {
    if db.exists() {
        return Err(Error::Usage {
            what: "stress database",
            reason: format!("{} exists; stress needs a fresh file", db.display()),
        });
    }
    run_side_in(label, db, None, load, plain)
}

/// [`run_side`] on a database that is known to be fresh: a file (barrier files beside it) or
/// a server's (barrier files in `barrier_dir`).
fn run_side_in(
    label: &'static str,
    db: &Path,
    barrier_dir: Option<&Path>,
    load: Load,
    plain: bool,
) -> Result<Report, Error> {
    let mut args: Vec<String> = ["record", "--artifact", "stress", "--json", "--count"]
        .map(String::from)
        .into();
    args.push(load.writes.to_string());
    args.push("--hold-ms".to_owned());
    args.push(load.hold_ms.to_string());
    if super::transaction_pooling_declared() {
        args.push("--transaction-pooling".to_owned());
    }
    if plain {
        args.push("--plain".to_owned());
    } else if !load.fair_queue {
        args.push("--no-fair-queue".to_owned());
    }
    let (outputs, seconds) = run_together(label, db, barrier_dir, &args, load.processes, LIMIT)?;
    let mut report = Report {
        label,
        seconds,
        ..Report::default()
    };
    for output in &outputs {
        for line in output.stdout.lines() {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            report.acknowledged += 1;
            report
                .wait_ms
                .push(value["wait_us"].as_f64().unwrap_or(0.0) / 1000.0);
        }
        // One time-to-ready per process: every line repeats it, take the first.
        if let Some(first) = output.stdout.lines().next() {
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(first) {
                report
                    .ready_ms
                    .push(value["ready_us"].as_f64().unwrap_or(0.0) / 1000.0);
            }
        }
        if let Some(cause) = output.failure() {
            report.failed += 1;
            *report.causes.entry(cause.to_owned()).or_default() += 1;
            report.hints.extend(output.hint().map(str::to_owned));
        }
    }
    if barrier_dir.is_some() {
        #[cfg(feature = "postgres")]
        check_server(&db.to_string_lossy(), &mut report)?;
    } else {
        check_file(db, &mut report)?;
        remove_side_files(db);
    }
    report.wait_ms.sort_by(f64::total_cmp);
    report.ready_ms.sort_by(f64::total_cmp);
    Ok(report)
}

#[derive(QueryableByName)]
struct Counts {
    #[diesel(sql_type = BigInt)]
    rows: i64,
    #[diesel(sql_type = BigInt)]
    distinct_versions: i64,
    #[diesel(sql_type = BigInt)]
    max_version: i64,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Reads what really is in the file: versions stored, distinct and gapless; migrations.
fn check_file(db: &Path, report: &mut Report) -> Result<(), Error> {
    let mut conn =
        SqliteConnection::establish(&db.to_string_lossy()).map_err(|source| Error::Open {
            path: db.to_owned(),
            source,
        })?;
    check(
        &mut conn,
        "SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name = '{table}'",
        report,
    )
}

/// [`check_file`] for a server's database.
#[cfg(feature = "postgres")]
fn check_server(url: &str, report: &mut Report) -> Result<(), Error> {
    let mut conn = crate::pg::connect(url)?;
    check(
        &mut conn,
        "SELECT count(*) AS n FROM pg_tables WHERE schemaname = current_schema() \
         AND tablename = '{table}'",
        report,
    )
}

/// The checks of [`check_file`] on `conn`; `exists` counts the tables named `{table}`.
fn check<C>(conn: &mut C, exists: &str, report: &mut Report) -> Result<(), Error>
where
    C: diesel::Connection,
    diesel::query_builder::SqlQuery: diesel::query_dsl::LoadQuery<'static, C, Count>
        + diesel::query_dsl::LoadQuery<'static, C, Counts>,
{
    let query = |source| Error::Query {
        operation: "check the stress database",
        source,
    };
    let exists = |conn: &mut C, table: &str| -> Result<bool, Error> {
        Ok(diesel::sql_query(exists.replace("{table}", table))
            .get_result::<Count>(conn)
            .map_err(query)?
            .n
            > 0)
    };
    if exists(conn, "artifact_versions")? {
        let counts = diesel::sql_query(
            "SELECT count(*) AS rows, count(DISTINCT version) AS distinct_versions, \
             coalesce(max(version), 0) AS max_version FROM artifact_versions",
        )
        .get_result::<Counts>(conn)
        .map_err(query)?;
        report.stored = counts.rows;
        report.distinct_gapless =
            counts.rows == counts.distinct_versions && counts.rows == counts.max_version;
    } else {
        report.distinct_gapless = true;
    }
    if exists(conn, "__diesel_schema_migrations")? {
        report.migrations =
            diesel::sql_query("SELECT count(*) AS n FROM __diesel_schema_migrations")
                .get_result::<Count>(conn)
                .map_err(query)?
                .n;
    }
    Ok(())
}

/// The value at quantile `q` of sorted `values` (NaN if empty).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values[((values.len() as f64 * q) as usize).min(values.len() - 1)]
}

impl Report {
    /// Whether this side had no failure and a consistent file.
    pub fn clean(&self, load: Load) -> bool {
        self.failed == 0
            && self.acknowledged == load.processes * load.writes as usize
            && self.stored as usize == self.acknowledged
            && self.distinct_gapless
            && self.migrations == 3
    }

    /// Every figure, for `--json`.
    pub fn json(&self, load: Load) -> serde_json::Value {
        serde_json::json!({
            "label": self.label,
            "failed_processes": self.failed,
            "failures_by_cause": self.causes,
            "hints": self.hints,
            "acknowledged_writes": self.acknowledged,
            "stored_versions": self.stored,
            "distinct_gapless": self.distinct_gapless,
            "migrations_recorded": self.migrations,
            "ready_ms": {"p50": quantile(&self.ready_ms, 0.5), "p99": quantile(&self.ready_ms, 0.99), "max": self.ready_ms.last()},
            "wait_ms": {"p50": quantile(&self.wait_ms, 0.5), "p99": quantile(&self.wait_ms, 0.99), "max": self.wait_ms.last()},
            "fair_wait_ms": load.processes as u64 * load.hold_ms,
            "writes_per_second": self.acknowledged as f64 / self.seconds,
            "seconds": self.seconds,
            "clean": self.clean(load),
        })
    }
}

/// One cell of a table row, computed from a side's report.
type Cell<'a> = Box<dyn Fn(&Report) -> String + 'a>;

impl Column for Report {
    fn label(&self) -> &str {
        self.label
    }

    fn causes(&self) -> &BTreeMap<String, usize> {
        &self.causes
    }

    fn hints(&self) -> &BTreeSet<String> {
        &self.hints
    }
}

/// The side-by-side table.
///
/// # Errors
/// [`Error::Output`] if standard output cannot be written.
pub fn print_table(load: Load, reports: &[Report]) -> Result<(), Error> {
    let fair = (load.processes as u64 * load.hold_ms) as f64;
    crate::outln!(
        "stress: {} processes x {} writes, each holding the write lock {} ms; fair wait {} ms",
        load.processes,
        load.writes,
        load.hold_ms,
        fair
    )?;
    let ms = |v: f64| {
        if v.is_nan() {
            "-".to_owned()
        } else {
            format!("{v:.0} ms")
        }
    };
    let rows: Vec<(&str, Cell)> = vec![
        (
            "failed processes",
            Box::new(|r| format!("{} of {}", r.failed, load.processes)),
        ),
        (
            "acknowledged writes",
            Box::new(|r| {
                format!(
                    "{} of {}",
                    r.acknowledged,
                    load.processes * load.writes as usize
                )
            }),
        ),
        (
            "versions stored",
            Box::new(|r| {
                format!(
                    "{}{}",
                    r.stored,
                    if r.distinct_gapless {
                        ", distinct, gapless"
                    } else {
                        ", DUPLICATES OR GAPS"
                    }
                )
            }),
        ),
        (
            "migrations recorded",
            Box::new(|r| format!("{} of 3", r.migrations)),
        ),
        (
            "time to ready p50",
            Box::new(move |r| ms(quantile(&r.ready_ms, 0.5))),
        ),
        (
            "time to ready max",
            Box::new(move |r| ms(r.ready_ms.last().copied().unwrap_or(f64::NAN))),
        ),
        (
            "lock wait p50",
            Box::new(move |r| ms(quantile(&r.wait_ms, 0.5))),
        ),
        (
            "lock wait p99",
            Box::new(move |r| ms(quantile(&r.wait_ms, 0.99))),
        ),
        (
            "lock wait max",
            Box::new(move |r| match r.wait_ms.last() {
                Some(max) if fair > 0.0 => format!("{max:.0} ms ({:.2} x fair)", max / fair),
                Some(max) => format!("{max:.0} ms"),
                None => "-".to_owned(),
            }),
        ),
        (
            "throughput",
            Box::new(|r| format!("{:.0} writes/s", r.acknowledged as f64 / r.seconds)),
        ),
    ];
    table::print(&rows, reports)
}
