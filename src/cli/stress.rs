//! `sqlite-persistence stress`: N real processes of this binary record K versions each on a
//! fresh database, started together; the report says whether this filesystem and this load
//! are safe, and (with `--compare`) how the plain Diesel setup fares under the same load.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use sqlite_persistence::Error;

/// The workload.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub processes: usize,
    pub writes: u32,
    pub hold_ms: u64,
}

/// What one side of the run measured.
#[derive(Debug, Default)]
pub struct Report {
    pub label: &'static str,
    pub failed: usize,
    pub causes: BTreeMap<String, usize>,
    pub acknowledged: usize,
    pub stored: i64,
    pub distinct_gapless: bool,
    pub migrations: i64,
    pub ready_ms: Vec<f64>,
    pub wait_ms: Vec<f64>,
    pub seconds: f64,
}

/// A thread reading one pipe of a child to its end.
type Drain = std::thread::JoinHandle<String>;

fn drain(pipe: Option<impl Read + Send + 'static>) -> Drain {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

fn join(drain: Drain) -> String {
    drain.join().unwrap_or_default()
}

/// The longest a side may run before its processes are killed.
const LIMIT: Duration = Duration::from_secs(300);

/// Runs `load` against a fresh database at `db` with this binary (`plain` for the baseline).
pub fn run_side(label: &'static str, db: &Path, load: Load, plain: bool) -> Result<Report, Error> {
    if db.exists() {
        return Err(Error::Invalid {
            what: "stress database",
            reason: format!("{} exists; stress needs a fresh file", db.display()),
        });
    }
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        operation: "find the path of",
        path: PathBuf::from("the running binary"),
        source,
    })?;
    let barrier = PathBuf::from(format!("{}.barrier", db.display()));
    let writes = load.writes.to_string();
    let hold = load.hold_ms.to_string();
    let mut args = vec![
        "record",
        "--artifact",
        "stress",
        "--count",
        &writes,
        "--hold-ms",
        &hold,
    ];
    args.push("--json");
    if plain {
        args.push("--plain");
    }
    let io = |operation, source| Error::Io {
        operation,
        path: db.to_owned(),
        source,
    };
    let mut children: Vec<Child> = Vec::with_capacity(load.processes);
    for _ in 0..load.processes {
        let child = Command::new(&exe)
            .args(&args)
            .arg("--db")
            .arg(db)
            .arg("--barrier")
            .arg(&barrier)
            .env_remove("SQLITE_PERSISTENCE_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io("start a process for", e))?;
        children.push(child);
    }
    let ready_prefix = format!("{}.ready-", barrier.file_name().unwrap().to_string_lossy());
    let dir = db.parent().unwrap_or(Path::new("."));
    let start = Instant::now();
    loop {
        let ready = std::fs::read_dir(dir)
            .map_err(|e| io("list the directory of", e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&ready_prefix))
            .count();
        if ready == load.processes {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            children.iter_mut().for_each(|c| drop(c.kill()));
            return Err(Error::Invalid {
                what: "stress run",
                reason: format!("only {ready} of {} processes started", load.processes),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let released = Instant::now();
    std::fs::write(&barrier, b"go").map_err(|e| io("release the barrier next to", e))?;
    let progress = std::io::stderr().is_terminal();
    // Read every child's output while it runs: a child that fills its pipe (64 KiB, some
    // 800 JSON lines) would block in write() until someone reads.
    let mut running: Vec<(Child, Drain, Drain)> = children
        .into_iter()
        .map(|mut child| {
            let stdout = drain(child.stdout.take());
            let stderr = drain(child.stderr.take());
            (child, stdout, stderr)
        })
        .collect();
    let mut outputs: Vec<(bool, String, String)> = Vec::new();
    while !running.is_empty() {
        let mut i = 0;
        while i < running.len() {
            match running[i]
                .0
                .try_wait()
                .map_err(|e| io("wait for a process on", e))?
            {
                Some(status) => {
                    let (_, stdout, stderr) = running.swap_remove(i);
                    outputs.push((status.success(), join(stdout), join(stderr)));
                }
                None => i += 1,
            }
        }
        if released.elapsed() > LIMIT {
            running.iter_mut().for_each(|(c, _, _)| drop(c.kill()));
            return Err(Error::Invalid {
                what: "stress run",
                reason: format!("processes still running after {} s", LIMIT.as_secs()),
            });
        }
        if progress {
            eprint!(
                "\r{label}: {}/{} processes done",
                outputs.len(),
                load.processes
            );
            let _ = std::io::stderr().flush();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if progress {
        eprint!("\r\x1b[K");
    }
    let mut report = Report {
        label,
        seconds: released.elapsed().as_secs_f64(),
        ..Report::default()
    };
    for (success, stdout, stderr) in &outputs {
        for line in stdout.lines() {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            report.acknowledged += 1;
            report
                .wait_ms
                .push(value["wait_us"].as_f64().unwrap_or(0.0) / 1000.0);
        }
        // One time-to-ready per process: every line repeats it, take the first.
        if let Some(first) = stdout.lines().next() {
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(first) {
                report
                    .ready_ms
                    .push(value["ready_us"].as_f64().unwrap_or(0.0) / 1000.0);
            }
        }
        if !success {
            report.failed += 1;
            let cause = stderr
                .lines()
                .find_map(|l| l.strip_prefix("error: "))
                .unwrap_or("exited without an error line")
                .to_owned();
            *report.causes.entry(cause).or_default() += 1;
        }
    }
    check_file(db, &mut report)?;
    for suffix in ["-wal", "-shm", "-lock", ".barrier"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    for entry in std::fs::read_dir(dir)
        .map_err(|e| io("list the directory of", e))?
        .flatten()
    {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&ready_prefix)
        {
            let _ = std::fs::remove_file(entry.path());
        }
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
    let query = |source| Error::Query {
        operation: "check the stress database",
        source,
    };
    let mut conn =
        SqliteConnection::establish(&db.to_string_lossy()).map_err(|source| Error::Open {
            path: db.to_owned(),
            source,
        })?;
    let exists = |conn: &mut SqliteConnection, table: &str| -> Result<bool, Error> {
        Ok(diesel::sql_query(format!(
            "SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name = '{table}'"
        ))
        .get_result::<Count>(conn)
        .map_err(query)?
        .n > 0)
    };
    if exists(&mut conn, "artifact_versions")? {
        let counts = diesel::sql_query(
            "SELECT count(*) AS rows, count(DISTINCT version) AS distinct_versions, \
             coalesce(max(version), 0) AS max_version FROM artifact_versions",
        )
        .get_result::<Counts>(&mut conn)
        .map_err(query)?;
        report.stored = counts.rows;
        report.distinct_gapless =
            counts.rows == counts.distinct_versions && counts.rows == counts.max_version;
    } else {
        report.distinct_gapless = true;
    }
    if exists(&mut conn, "__diesel_schema_migrations")? {
        report.migrations =
            diesel::sql_query("SELECT count(*) AS n FROM __diesel_schema_migrations")
                .get_result::<Count>(&mut conn)
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

    pub fn json(&self, load: Load) -> serde_json::Value {
        serde_json::json!({
            "label": self.label,
            "failed_processes": self.failed,
            "failures_by_cause": self.causes,
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

/// The side-by-side table.
pub fn print_table(load: Load, reports: &[Report]) {
    let fair = (load.processes as u64 * load.hold_ms) as f64;
    println!(
        "stress: {} processes x {} writes, each holding the write lock {} ms; fair wait {} ms",
        load.processes, load.writes, load.hold_ms, fair
    );
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
    print!("{:22}", "");
    for r in reports {
        print!("{:>30}", r.label);
    }
    println!();
    for (name, cell) in &rows {
        print!("{name:22}");
        for r in reports {
            print!("{:>30}", cell(r));
        }
        println!();
    }
    for r in reports.iter().filter(|r| !r.causes.is_empty()) {
        println!("{} failures by cause:", r.label);
        for (cause, n) in &r.causes {
            println!("  {n:>4} x {cause}");
        }
    }
}
