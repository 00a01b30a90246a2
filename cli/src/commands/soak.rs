//! `sqlite-persistence soak`: N real processes mix reads and writes on one fresh database for
//! a bounded time. Every write a process acknowledged must be in the file at the end, no read
//! may see a partial write (a version without its artifact's latest, or a gap), and the file
//! must pass `PRAGMA integrity_check`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// Milliseconds since the Unix epoch: the clock the workers and the backups share.
fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `soak-worker`: until `seconds` pass, record a version of a random artifact or read one
/// and check the snapshot is whole, half and half. Prints each acknowledged write as
/// `{"artifact", "version", "us" (how long the write took), "at_ms" (when it was
/// acknowledged)}` after its commit, and `{"reads": N}` at the end.
pub fn work(path: &Path, seconds: u64, plain: bool) -> Result<(), Error> {
    crate::commands::sqlite_only(path, "soak")?;
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
            let asked = Instant::now();
            let recorded = match &store {
                Store::Layer(catalog) => catalog.record(artifact)?,
                Store::Plain(catalog) => catalog.record_holding(artifact, Duration::ZERO)?,
            };
            crate::outln!(
                "{}",
                serde_json::json!({
                    "artifact": artifact,
                    "version": recorded.version,
                    "us": asked.elapsed().as_micros() as u64,
                    "at_ms": unix_ms(SystemTime::now()),
                })
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
    backup_every: Option<Duration>,
    json: bool,
) -> Result<(), Error> {
    if let Some(db) = &db {
        crate::commands::sqlite_only(db, "soak")?;
    }
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
            backup_every,
        )?];
        if compare {
            let plain = plain_path(db);
            reports.push(run_side(
                "plain diesel",
                &plain,
                processes,
                seconds,
                true,
                None,
            )?);
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
    /// The hints they printed with their errors, each once.
    pub hints: BTreeSet<String>,
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
    /// How long the acknowledged writes took, median and 99th percentile, in microseconds.
    pub write_p50_us: u64,
    /// See `write_p50_us`.
    pub write_p99_us: u64,
    /// The backups taken during the run (`--backup-every-ms`).
    pub backups: Backups,
}

/// What the backups taken during a soak found.
#[derive(Debug, Default)]
pub struct Backups {
    /// Backups that completed (each synced and integrity-checked by `backup_to`).
    pub taken: usize,
    /// Backups that failed, with the first error.
    pub failed: usize,
    /// The first failure's message.
    pub first_failure: Option<String>,
    /// Writes acknowledged before a backup began that the backup does not hold, summed.
    pub missing_writes: usize,
    /// Backups whose `PRAGMA integrity_check` (run again here) is not "ok".
    pub not_ok: usize,
    /// The longest backup, in milliseconds.
    pub longest_ms: u64,
}

impl Report {
    /// No failure, nothing missing, every artifact whole, integrity ok.
    pub fn clean(&self) -> bool {
        self.failed == 0
            && self.missing == 0
            && self.whole
            && self.integrity == "ok"
            && self.backups.failed == 0
            && self.backups.missing_writes == 0
            && self.backups.not_ok == 0
    }

    /// Every figure, for `--json`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "label": self.label,
            "processes": self.processes,
            "failed_processes": self.failed,
            "failures": self.causes,
            "hints": self.hints,
            "acknowledged_writes": self.acknowledged,
            "reads": self.reads,
            "missing_writes": self.missing,
            "stored_versions": self.stored,
            "whole": self.whole,
            "integrity": self.integrity,
            "seconds": self.seconds,
            "write_p50_us": self.write_p50_us,
            "write_p99_us": self.write_p99_us,
            "backups": {
                "taken": self.backups.taken,
                "failed": self.backups.failed,
                "first_failure": self.backups.first_failure,
                "missing_writes": self.backups.missing_writes,
                "not_ok": self.backups.not_ok,
                "longest_ms": self.backups.longest_ms,
            },
            "clean": self.clean(),
        })
    }
}

/// Runs `processes` workers for `seconds` on a fresh database at `db`, then checks the file;
/// with `backup_every`, this process also backs the database up that often meanwhile, and
/// checks each backup holds every write acknowledged before it began.
pub fn run_side(
    label: &'static str,
    db: &Path,
    processes: usize,
    seconds: u64,
    plain: bool,
    backup_every: Option<Duration>,
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
    let stop = Arc::new(AtomicBool::new(false));
    let backups = backup_every.map(|every| {
        let (db, stop) = (db.to_owned(), Arc::clone(&stop));
        std::thread::spawn(move || take_backups(&db, every, &stop))
    });
    let together = run_together(label, db, None, &args, processes, limit);
    stop.store(true, Ordering::SeqCst);
    let taken = match backups {
        Some(thread) => thread.join().unwrap_or_default(),
        None => Vec::new(),
    };
    let (outputs, elapsed) = together?;
    let mut report = Report {
        label,
        processes,
        seconds: elapsed,
        ..Report::default()
    };
    let mut acknowledged = BTreeMap::new();
    let mut latencies = Vec::new();
    for output in &outputs {
        for value in output
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            if let (Some(artifact), Some(version)) =
                (value["artifact"].as_str(), value["version"].as_i64())
            {
                let at = value["at_ms"].as_u64().unwrap_or(u64::MAX);
                acknowledged.insert((artifact.to_owned(), version), at);
                latencies.extend(value["us"].as_u64());
                report.acknowledged += 1;
            }
            report.reads += value["reads"].as_u64().unwrap_or(0);
        }
        if let Some(cause) = output.failure() {
            report.failed += 1;
            *report.causes.entry(cause.to_owned()).or_default() += 1;
            report.hints.extend(output.hint().map(str::to_owned));
        }
    }
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    (report.write_p50_us, report.write_p99_us) = (at(0.5), at(0.99));
    let set: BTreeSet<(String, i64)> = acknowledged.keys().cloned().collect();
    check_file(db, &set, &mut report)?;
    check_backups(&taken, &acknowledged, &mut report.backups);
    remove_side_files(db);
    Ok(report)
}

/// One backup taken during a soak: when it began, where, and how it went.
struct Taken {
    began_ms: u64,
    path: PathBuf,
    result: Result<Duration, String>,
}

/// Backs `db` up every `every` until `stop`, into files beside it.
fn take_backups(db: &Path, every: Duration, stop: &AtomicBool) -> Vec<Taken> {
    let mut taken = Vec::new();
    let pause = |stop: &AtomicBool| {
        let until = Instant::now() + every;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10).min(every));
        }
        !stop.load(Ordering::SeqCst)
    };
    // The workers create and migrate the file; open it once they have.
    let catalog = loop {
        if !pause(stop) {
            return taken;
        }
        if let Ok(catalog) = Catalog::open(db, Options::new()) {
            break catalog;
        }
    };
    loop {
        let path = PathBuf::from(format!("{}.soak-backup-{}", db.display(), taken.len()));
        let began_ms = unix_ms(SystemTime::now());
        let result = catalog
            .database()
            .backup_to(&path)
            .map(|backup| backup.elapsed)
            .map_err(|e| e.to_string());
        taken.push(Taken {
            began_ms,
            path,
            result,
        });
        if !pause(stop) {
            return taken;
        }
    }
}

/// Checks each backup in `taken` against the writes acknowledged before it began, then
/// removes it.
fn check_backups(
    taken: &[Taken],
    acknowledged: &BTreeMap<(String, i64), u64>,
    backups: &mut Backups,
) {
    for backup in taken {
        match &backup.result {
            Err(error) => {
                backups.failed += 1;
                backups.first_failure.get_or_insert_with(|| error.clone());
            }
            Ok(elapsed) => {
                backups.taken += 1;
                backups.longest_ms = backups.longest_ms.max(elapsed.as_millis() as u64);
                let mut report = Report::default();
                let before: BTreeSet<(String, i64)> = acknowledged
                    .iter()
                    .filter(|(_, at)| **at < backup.began_ms)
                    .map(|(write, _)| write.clone())
                    .collect();
                match check_file(&backup.path, &before, &mut report) {
                    Ok(()) => {
                        backups.missing_writes += report.missing;
                        backups.not_ok += usize::from(report.integrity != "ok" || !report.whole);
                    }
                    Err(error) => {
                        backups.not_ok += 1;
                        backups
                            .first_failure
                            .get_or_insert_with(|| error.to_string());
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&backup.path);
    }
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

    fn hints(&self) -> &BTreeSet<String> {
        &self.hints
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
    let rows: [Row; 9] = [
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
        ("write ms p50 / p99", |r| {
            format!(
                "{:.2} / {:.2}",
                r.write_p50_us as f64 / 1000.0,
                r.write_p99_us as f64 / 1000.0
            )
        }),
        ("backups ok / missing", |r| {
            let b = &r.backups;
            if b.taken + b.failed == 0 {
                "-".to_owned()
            } else {
                format!(
                    "{} of {} / {} writes",
                    b.taken.saturating_sub(b.not_ok),
                    b.taken + b.failed,
                    b.missing_writes
                )
            }
        }),
    ];
    table::print(&rows, reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_missing_a_write_acknowledged_before_it_began_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let catalog = Catalog::open(&db, Options::new()).unwrap();
        catalog.record("soak-a").unwrap();
        let backup = dir.path().join("b.db");
        catalog.database().backup_to(&backup).unwrap();
        let began_ms = unix_ms(SystemTime::now());
        // Version 1 is in the backup; version 2 (acknowledged before the backup began, as
        // far as the clock says) is not; version 3 came after it.
        let acknowledged = BTreeMap::from([
            (("soak-a".to_owned(), 1), began_ms - 10),
            (("soak-a".to_owned(), 2), began_ms - 5),
            (("soak-a".to_owned(), 3), began_ms + 5),
        ]);
        let taken = [
            Taken {
                began_ms,
                path: backup.clone(),
                result: Ok(Duration::from_millis(1)),
            },
            Taken {
                began_ms,
                path: dir.path().join("never.db"),
                result: Err("disk full".to_owned()),
            },
        ];
        let mut backups = Backups::default();
        check_backups(&taken, &acknowledged, &mut backups);
        assert_eq!(backups.taken, 1);
        assert_eq!(backups.missing_writes, 1);
        assert_eq!(backups.not_ok, 0);
        assert_eq!(backups.failed, 1);
        assert_eq!(backups.first_failure.as_deref(), Some("disk full"));
        assert!(!backup.exists(), "a checked backup is removed");
    }

    #[test]
    fn a_snapshot_is_whole_only_with_every_version_up_to_the_latest() {
        assert!(whole(0, &[]));
        assert!(whole(3, &[1, 2, 3]));
        assert!(!whole(3, &[1, 2]), "latest without its version row");
        assert!(!whole(2, &[1, 2, 3]), "a version row without the latest");
        assert!(!whole(3, &[1, 3, 3]));
    }
}
