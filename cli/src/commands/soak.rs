//! `sqlite-persistence soak`: N real processes mix reads and writes on one fresh database for
//! a bounded time. Every write a process acknowledged must be in the file at the end, no read
//! may see a partial write (a version without its artifact's latest, or a gap), and the file
//! must pass `PRAGMA integrity_check`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sqlite_persistence::Options;

use crate::catalog::Catalog;
use crate::commands::{clean_or_error, on_fresh_db, plain_path};
use crate::error::Error;
use crate::harness::children::{remove_side_files, run_together};
use crate::harness::table::{self, Column};
use crate::plain::PlainCatalog;

/// The longest soak: 30 days.
const MAX_SECONDS: u64 = 30 * 24 * 3600;

/// The artifacts the workers share, so that they contend.
const ARTIFACTS: [&str; 4] = ["soak-a", "soak-b", "soak-c", "soak-d"];

#[derive(QueryableByName)]
struct Version {
    #[diesel(sql_type = BigInt)]
    version: i64,
}

#[derive(QueryableByName)]
struct Latest {
    #[diesel(sql_type = BigInt)]
    latest_version: i64,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Check {
    #[diesel(sql_type = Text)]
    integrity_check: String,
}

/// What one artifact looks like in one snapshot: its latest version and every version row.
fn snapshot(conn: &mut SqliteConnection, artifact: &str) -> QueryResult<(i64, Vec<i64>)> {
    let latest = diesel::sql_query("SELECT latest_version FROM artifacts WHERE name = ?")
        .bind::<Text, _>(artifact)
        .get_result::<Latest>(conn)
        .optional()?
        .map_or(0, |row| row.latest_version);
    let versions = diesel::sql_query(
        "SELECT version FROM artifact_versions JOIN artifacts ON artifacts.id = artifact_id \
         WHERE artifacts.name = ? ORDER BY version",
    )
    .bind::<Text, _>(artifact)
    .load::<Version>(conn)?
    .into_iter()
    .map(|row| row.version)
    .collect();
    Ok((latest, versions))
}

/// Whether a snapshot is whole: versions 1..=latest, each once.
fn whole(latest: i64, versions: &[i64]) -> bool {
    versions.iter().copied().eq(1..=latest)
}

/// `soak-worker`: until `seconds` pass, record a version of a random artifact or read one
/// and check the snapshot is whole, half and half. Prints each acknowledged write as
/// `{"artifact", "version"}` after its commit, and `{"reads": N}` at the end.
pub fn work(path: &Path, seconds: u64, plain: bool) -> Result<(), Error> {
    enum Store {
        Layer(Box<Catalog>),
        Plain(PlainCatalog),
    }
    let store = if plain {
        Store::Plain(PlainCatalog::open(path)?)
    } else {
        Store::Layer(Box::new(Catalog::open(path, Options::new())?))
    };
    let mut rng = SmallRng::from_os_rng();
    let end = Instant::now()
        .checked_add(Duration::from_secs(seconds.min(MAX_SECONDS)))
        .expect("30 days from now is a time");
    let mut reads = 0u64;
    while Instant::now() < end {
        let artifact = ARTIFACTS[rng.random_range(0..ARTIFACTS.len())];
        if rng.random_bool(0.5) {
            let recorded = match &store {
                Store::Layer(catalog) => catalog.record(artifact)?,
                Store::Plain(catalog) => catalog.record_holding(artifact, Duration::ZERO)?,
            };
            crate::outln!(
                "{}",
                serde_json::json!({"artifact": artifact, "version": recorded.version})
            )?;
            continue;
        }
        let (latest, versions) = match &store {
            Store::Layer(catalog) => catalog
                .database()
                .read(|conn| -> sqlite_persistence::Result<_> { Ok(snapshot(conn, artifact)?) })?,
            Store::Plain(catalog) => catalog
                .connection()?
                .transaction(|conn| snapshot(conn, artifact))
                .map_err(|source| Error::Query {
                    operation: "read a snapshot",
                    source,
                })?,
        };
        if !whole(latest, &versions) {
            return Err(Error::PartialWrite {
                artifact: artifact.to_owned(),
                latest,
                versions,
            });
        }
        reads += 1;
    }
    crate::outln!("{}", serde_json::json!({ "reads": reads }))?;
    Ok(())
}

/// `soak`, laid out as `stress`.
pub fn run(
    db: Option<PathBuf>,
    processes: usize,
    seconds: u64,
    compare: bool,
    json: bool,
) -> Result<(), Error> {
    if processes == 0 || !(1..=MAX_SECONDS).contains(&seconds) {
        return Err(Error::Usage {
            what: "soak load",
            reason: format!(
                "--processes must be at least 1, and --seconds from 1 to {MAX_SECONDS} (30 days)"
            ),
        });
    }
    let reports = on_fresh_db(db, "soak", |db| {
        let mut reports = vec![run_side(
            "sqlite-persistence",
            db,
            processes,
            seconds,
            false,
        )?];
        if compare {
            let plain = plain_path(db);
            reports.push(run_side("plain diesel", &plain, processes, seconds, true)?);
        }
        Ok(reports)
    })?;
    if json {
        let sides: Vec<_> = reports.iter().map(Report::json).collect();
        crate::outln!(
            "{}",
            serde_json::json!({ "load": {"processes": processes, "seconds": seconds}, "sides": sides })
        )?;
    } else {
        print_table(processes, seconds, &reports)?;
    }
    clean_or_error("soak", reports[0].clean())
}

/// What one side of a soak found.
#[derive(Debug, Default)]
pub struct Report {
    /// The side's name.
    pub label: &'static str,
    /// How many processes ran.
    pub processes: usize,
    /// Processes that exited with an error.
    pub failed: usize,
    /// Their errors, counted.
    pub causes: BTreeMap<String, usize>,
    /// Writes the processes printed after their commit.
    pub acknowledged: usize,
    /// Reads, each of a whole snapshot.
    pub reads: u64,
    /// Acknowledged writes not in the file at the end.
    pub missing: usize,
    /// Version rows in the file.
    pub stored: usize,
    /// Every artifact's versions are 1..=latest.
    pub whole: bool,
    /// What `PRAGMA integrity_check` said.
    pub integrity: String,
    /// From the release of the barrier to the last exit.
    pub seconds: f64,
}

impl Report {
    /// No failure, nothing missing, every artifact whole, integrity ok.
    pub fn clean(&self) -> bool {
        self.failed == 0 && self.missing == 0 && self.whole && self.integrity == "ok"
    }

    /// Every figure, for `--json`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "label": self.label,
            "processes": self.processes,
            "failed_processes": self.failed,
            "failures": self.causes,
            "acknowledged_writes": self.acknowledged,
            "reads": self.reads,
            "missing_writes": self.missing,
            "stored_versions": self.stored,
            "whole": self.whole,
            "integrity": self.integrity,
            "seconds": self.seconds,
            "clean": self.clean(),
        })
    }
}

/// Runs `processes` workers for `seconds` on a fresh database at `db`, then checks the file.
pub fn run_side(
    label: &'static str,
    db: &Path,
    processes: usize,
    seconds: u64,
    plain: bool,
) -> Result<Report, Error> {
    let mut args = vec![
        "soak-worker".to_owned(),
        "--seconds".to_owned(),
        seconds.to_string(),
    ];
    if plain {
        args.push("--plain".to_owned());
    }
    let limit = Duration::from_secs(seconds + 120);
    let (outputs, elapsed) = run_together(label, db, &args, processes, limit)?;
    let mut report = Report {
        label,
        processes,
        seconds: elapsed,
        ..Report::default()
    };
    let mut acknowledged = BTreeSet::new();
    for output in &outputs {
        for value in output
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            if let (Some(artifact), Some(version)) =
                (value["artifact"].as_str(), value["version"].as_i64())
            {
                acknowledged.insert((artifact.to_owned(), version));
                report.acknowledged += 1;
            }
            report.reads += value["reads"].as_u64().unwrap_or(0);
        }
        if let Some(cause) = output.failure() {
            report.failed += 1;
            *report.causes.entry(cause.to_owned()).or_default() += 1;
        }
    }
    check_file(db, &acknowledged, &mut report)?;
    remove_side_files(db);
    Ok(report)
}

fn check_file(
    db: &Path,
    acknowledged: &BTreeSet<(String, i64)>,
    report: &mut Report,
) -> Result<(), Error> {
    let mut conn =
        SqliteConnection::establish(&db.to_string_lossy()).map_err(|source| Error::Open {
            path: db.to_owned(),
            source,
        })?;
    let query = |source| Error::Query {
        operation: "check the soak database",
        source,
    };
    let mut stored = BTreeSet::new();
    report.whole = true;
    let has_tables = diesel::sql_query(
        "SELECT count(*) AS n FROM sqlite_master WHERE name = 'artifact_versions'",
    )
    .get_result::<Count>(&mut conn)
    .map_err(query)?
    .n > 0;
    if has_tables {
        for artifact in ARTIFACTS {
            let (latest, versions) = snapshot(&mut conn, artifact).map_err(query)?;
            report.whole &= whole(latest, &versions);
            stored.extend(versions.into_iter().map(|v| (artifact.to_owned(), v)));
        }
    }
    report.stored = stored.len();
    report.missing = acknowledged.difference(&stored).count();
    report.integrity = diesel::sql_query("PRAGMA integrity_check")
        .load::<Check>(&mut conn)
        .map_err(query)?
        .into_iter()
        .map(|row| row.integrity_check)
        .collect::<Vec<_>>()
        .join("; ");
    Ok(())
}

/// A row of the table: its name and how a side's cell is rendered.
type Row = (&'static str, fn(&Report) -> String);

impl Column for Report {
    fn label(&self) -> &str {
        self.label
    }

    fn causes(&self) -> &BTreeMap<String, usize> {
        &self.causes
    }
}

/// The side-by-side table.
///
/// # Errors
/// [`Error::Output`] if standard output cannot be written.
pub fn print_table(processes: usize, seconds: u64, reports: &[Report]) -> Result<(), Error> {
    crate::outln!(
        "soak: {processes} processes mixing reads and writes for {seconds} s on one fresh file"
    )?;
    let rows: [Row; 7] = [
        ("failed processes", |r| {
            format!("{} of {}", r.failed, r.processes)
        }),
        ("acknowledged writes", |r| r.acknowledged.to_string()),
        ("missing at the end", |r| r.missing.to_string()),
        ("reads, all whole", |r| r.reads.to_string()),
        ("versions 1..=latest", |r| {
            if r.whole { "yes" } else { "NO" }.to_owned()
        }),
        ("integrity_check", |r| r.integrity.clone()),
        ("writes/s", |r| {
            format!("{:.0}", r.acknowledged as f64 / r.seconds)
        }),
    ];
    table::print(&rows, reports)
}

#[cfg(test)]
mod tests {
    use super::whole;

    #[test]
    fn a_snapshot_is_whole_only_with_every_version_up_to_the_latest() {
        assert!(whole(0, &[]));
        assert!(whole(3, &[1, 2, 3]));
        assert!(!whole(3, &[1, 2]), "latest without its version row");
        assert!(!whole(2, &[1, 2, 3]), "a version row without the latest");
        assert!(!whole(3, &[1, 3, 3]));
    }
}
