//! `sqlite-persistence`: the command line over the crate's catalog.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[path = "cli/children.rs"]
mod children;
#[path = "cli/soak.rs"]
mod soak;
#[path = "cli/stress.rs"]
mod stress;
#[path = "cli/table.rs"]
mod table;
use diesel_migrations::FileBasedMigrations;
use sqlite_persistence::plain::PlainCatalog;
use sqlite_persistence::{
    error_chain, validate_artifact_name, Catalog, Error, Options, Recorded, Status, MIGRATIONS,
};

/// SQLite that many processes can open, migrate and write at once.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The database file [default: $DATABASE_URL, else catalog.db]
    #[arg(long, global = true, value_name = "PATH")]
    db: Option<PathBuf>,

    /// Wait until this file exists before opening the database (after creating
    /// PATH.ready-<pid>): lets a test or a benchmark start many processes together.
    #[arg(long, global = true, value_name = "PATH", hide = true)]
    barrier: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open the database and apply pending migrations; say what was applied.
    Migrate {
        /// A Diesel migrations directory to apply instead of the catalog's own.
        #[arg(long, value_name = "DIR")]
        migrations: Option<PathBuf>,
        /// Use the plain Diesel setup instead of this crate (the baseline for comparisons).
        #[arg(long, hide = true)]
        plain: bool,
    },
    /// Record new data versions of an artifact, one write transaction each.
    Record {
        /// The artifact's name.
        #[arg(long, value_name = "NAME")]
        artifact: String,
        /// How many versions to record.
        #[arg(long, value_name = "K", default_value_t = 1)]
        count: u32,
        /// Keep each write transaction open this long (simulated work).
        #[arg(long, value_name = "H", default_value_t = 0)]
        hold_ms: u64,
        /// One JSON object per line: artifact, version, wait_us, attempts, ready_us (from
        /// start to the database opened and migrated).
        #[arg(long)]
        json: bool,
        /// Do not queue on the `<database>-lock` sidecar (SQLite's busy handler and the retry
        /// policy only).
        #[arg(long)]
        no_fair_queue: bool,
        /// Use the plain Diesel setup instead of this crate (the baseline for comparisons).
        #[arg(long, hide = true)]
        plain: bool,
    },
    /// Start N real processes of this binary on a fresh database, each recording K versions,
    /// and report failures, consistency, time to ready, lock waits and throughput. A
    /// diagnostic for a filesystem and a load (`--db` on the filesystem to check).
    Stress {
        /// How many processes start together.
        #[arg(long, value_name = "N", default_value_t = 32)]
        processes: usize,
        /// How many versions each records, one write transaction each.
        #[arg(long, value_name = "K", default_value_t = 20)]
        writes: u32,
        /// How long each write transaction holds the lock (simulated work).
        #[arg(long, value_name = "H", default_value_t = 10)]
        hold_ms: u64,
        /// Also run the plain Diesel setup under the same load, side by side.
        #[arg(long)]
        compare: bool,
        /// One JSON object with every figure.
        #[arg(long)]
        json: bool,
    },
    /// Start N real processes that mix reads and writes on one fresh database for a bounded
    /// time; check that every acknowledged write is there and no read saw a partial one.
    Soak {
        /// How many processes start together.
        #[arg(long, value_name = "N", default_value_t = 8)]
        processes: usize,
        /// How long each process runs.
        #[arg(long, value_name = "S", default_value_t = 10)]
        seconds: u64,
        /// Also run the plain Diesel setup under the same load, side by side.
        #[arg(long)]
        compare: bool,
        /// One JSON object with every figure.
        #[arg(long)]
        json: bool,
    },
    /// One soak process (what `soak` starts).
    #[command(hide = true)]
    SoakWorker {
        #[arg(long, value_name = "S")]
        seconds: u64,
        #[arg(long)]
        plain: bool,
    },
    /// Show the filesystem, journal mode, application id, applied, pending and unknown
    /// migrations, checksum state, integrity (quick_check) and file sizes.
    Status {
        /// A Diesel migrations directory to compare with instead of the catalog's own.
        #[arg(long, value_name = "DIR")]
        migrations: Option<PathBuf>,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr; `SQLITE_PERSISTENCE_LOG` sets the filter (`warn` shows every retry,
/// `info` migrations, `debug` each migration). Defaults to errors only.
fn init_logging() {
    let filter = std::env::var("SQLITE_PERSISTENCE_LOG")
        .ok()
        .and_then(|spec| spec.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new()
                .with_default(tracing_subscriber::filter::LevelFilter::ERROR)
        });
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}

fn database_path(cli_db: Option<PathBuf>) -> PathBuf {
    cli_db.unwrap_or_else(|| match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => PathBuf::from(url.strip_prefix("sqlite://").unwrap_or(&url)),
        _ => PathBuf::from("catalog.db"),
    })
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Stress {
            processes,
            writes,
            hold_ms,
            compare,
            json,
        } => {
            let load = stress::Load {
                processes,
                writes,
                hold_ms,
            };
            return run_stress(cli.db, load, compare, json);
        }
        Command::Soak {
            processes,
            seconds,
            compare,
            json,
        } => return run_soak(cli.db, processes, seconds, compare, json),
        _ => {}
    }
    let path = database_path(cli.db);
    if let Some(barrier) = &cli.barrier {
        wait_for_barrier(barrier)?;
    }
    let started = Instant::now();
    match cli.command {
        Command::Migrate {
            migrations,
            plain: true,
        } => {
            match migrations {
                Some(dir) => PlainCatalog::open_with(&path, migration_dir(&dir)?)?,
                None => PlainCatalog::open(&path)?,
            };
        }
        Command::Migrate { migrations, .. } => {
            let db = match migrations {
                Some(dir) => Options::new().open(&path, migration_dir(&dir)?)?,
                None => Catalog::open(&path, Options::new())?.into_database(),
            };
            let applied = db.applied_at_open();
            if applied.is_empty() {
                println!("{}: up to date, nothing applied", path.display());
            } else {
                for name in applied {
                    println!("applied {name}");
                }
            }
        }
        Command::Record {
            artifact,
            count,
            hold_ms,
            json,
            no_fair_queue,
            plain,
        } => {
            // Before opening: a bad name must not create or migrate a database.
            validate_artifact_name(&artifact)?;
            let hold = Duration::from_millis(hold_ms);
            let print = |recorded: Recorded, ready: Duration| {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "artifact": recorded.artifact,
                            "version": recorded.version,
                            "wait_us": recorded.wait.as_micros() as u64,
                            "attempts": recorded.attempts,
                            "ready_us": ready.as_micros() as u64,
                        })
                    );
                } else {
                    println!("{} version {}", recorded.artifact, recorded.version);
                }
            };
            if plain {
                let catalog = PlainCatalog::open(&path)?;
                let ready = started.elapsed();
                for _ in 0..count {
                    print(catalog.record_holding(&artifact, hold)?, ready);
                }
            } else {
                let options = Options::new().fair_queue(!no_fair_queue);
                let catalog = Catalog::open(&path, options)?;
                let ready = started.elapsed();
                for _ in 0..count {
                    print(catalog.record_holding(&artifact, hold)?, ready);
                }
            }
        }
        Command::SoakWorker { seconds, plain } => soak::work(&path, seconds, plain)?,
        Command::Stress { .. } | Command::Soak { .. } => unreachable!("handled above"),
        Command::Status { migrations, json } => {
            let status = match migrations {
                Some(dir) => Status::read(&path, migration_dir(&dir)?, &Options::new())?,
                None => Status::read(&path, MIGRATIONS, &Options::new())?,
            };
            print_status(&status, json)
        }
    }
    Ok(())
}

/// A Diesel migrations directory, as `diesel migration` lays it out.
fn migration_dir(dir: &Path) -> Result<FileBasedMigrations, Error> {
    FileBasedMigrations::from_path(dir).map_err(|source| Error::MigrationSource {
        source: Box::new(source),
    })
}

/// Runs `run` on a fresh database: `--db PATH` (which must not exist), else `NAME` in a new
/// temporary directory, removed afterwards. Never `$DATABASE_URL`: a load test must not
/// touch a real database.
fn on_fresh_db<T>(
    db: Option<PathBuf>,
    name: &str,
    run: impl FnOnce(&Path) -> Result<T, Error>,
) -> Result<T, Error> {
    let (dir, db) = match db {
        Some(db) => (None, std::path::absolute(&db).unwrap_or(db)),
        None => {
            let dir = std::env::temp_dir()
                .join(format!("sqlite-persistence-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
                operation: "create",
                path: dir.clone(),
                source,
            })?;
            let db = dir.join(format!("{name}.db"));
            (Some(dir), db)
        }
    };
    let result = if db.exists() {
        Err(Error::Invalid {
            what: "database path",
            reason: format!("{} exists; {name} needs a fresh file", db.display()),
        })
    } else {
        run(&db)
    };
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

/// The plain side's database next to `db`.
fn plain_path(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}-plain", db.display()))
}

/// `stress`: the crate's side on a fresh file, and with `--compare` the plain side on
/// `PATH-plain`.
fn run_stress(
    db: Option<PathBuf>,
    load: stress::Load,
    compare: bool,
    json: bool,
) -> Result<(), Error> {
    if load.processes == 0 || load.writes == 0 {
        return Err(Error::Invalid {
            what: "stress load",
            reason: "--processes and --writes must be at least 1".to_owned(),
        });
    }
    let reports = on_fresh_db(db, "stress", |db| {
        let mut reports = vec![stress::run_side("sqlite-persistence", db, load, false)?];
        if compare {
            reports.push(stress::run_side(
                "plain diesel",
                &plain_path(db),
                load,
                true,
            )?);
        }
        Ok(reports)
    })?;
    if json {
        let sides: Vec<_> = reports.iter().map(|r| r.json(load)).collect();
        println!(
            "{}",
            serde_json::json!({ "load": {
            "processes": load.processes, "writes": load.writes, "hold_ms": load.hold_ms,
        }, "sides": sides })
        );
    } else {
        stress::print_table(load, &reports);
    }
    clean_or_error("stress", reports[0].clean(load))
}

/// `soak`, laid out as `stress`.
fn run_soak(
    db: Option<PathBuf>,
    processes: usize,
    seconds: u64,
    compare: bool,
    json: bool,
) -> Result<(), Error> {
    if processes == 0 || seconds == 0 {
        return Err(Error::Invalid {
            what: "soak load",
            reason: "--processes and --seconds must be at least 1".to_owned(),
        });
    }
    let reports = on_fresh_db(db, "soak", |db| {
        let mut reports = vec![soak::run_side(
            "sqlite-persistence",
            db,
            processes,
            seconds,
            false,
        )?];
        if compare {
            let plain = plain_path(db);
            reports.push(soak::run_side(
                "plain diesel",
                &plain,
                processes,
                seconds,
                true,
            )?);
        }
        Ok(reports)
    })?;
    if json {
        let sides: Vec<_> = reports.iter().map(soak::Report::json).collect();
        println!(
            "{}",
            serde_json::json!({ "load": {"processes": processes, "seconds": seconds}, "sides": sides })
        );
    } else {
        soak::print_table(processes, seconds, &reports);
    }
    clean_or_error("soak", reports[0].clean())
}

fn clean_or_error(what: &'static str, clean: bool) -> Result<(), Error> {
    if clean {
        Ok(())
    } else {
        Err(Error::Invalid {
            what,
            reason: "sqlite-persistence had failures or an inconsistent file (see above)"
                .to_owned(),
        })
    }
}

fn print_status(status: &Status, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "path": status.path,
                "exists": status.exists,
                "filesystem": status.filesystem,
                "network_filesystem": status.network_filesystem,
                "journal_mode": status.journal_mode,
                "application_id": status.application_id,
                "applied": status.applied,
                "pending": status.pending,
                "unknown": status.unknown,
                "checksums": {
                    "verified": status.checksums.verified,
                    "edited": status.checksums.edited,
                    "unrecorded": status.checksums.unrecorded,
                },
                "integrity": status.integrity,
                "sizes": {
                    "database": status.sizes.database,
                    "wal": status.sizes.wal,
                    "shm": status.sizes.shm,
                },
            })
        );
        return;
    }
    let list = |items: &[String]| {
        if items.is_empty() {
            "0".to_owned()
        } else {
            format!("{}: {}", items.len(), items.join(", "))
        }
    };
    let size = |bytes: Option<u64>| bytes.map_or("-".to_owned(), |b| format!("{b} B"));
    println!("database      {}", status.path.display());
    println!("exists        {}", if status.exists { "yes" } else { "no" });
    println!(
        "filesystem    {}{}",
        status.filesystem.as_deref().unwrap_or("-"),
        if status.network_filesystem {
            " (network: WAL refused)"
        } else {
            ""
        }
    );
    println!(
        "journal mode  {}",
        status.journal_mode.as_deref().unwrap_or("-")
    );
    println!(
        "app id        {}",
        status.application_id.map_or("-".to_owned(), |id| {
            let text: String = id
                .to_be_bytes()
                .iter()
                .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
                .collect();
            format!("{id:#010x} ({text})")
        })
    );
    println!("applied       {}", list(&status.applied));
    println!("pending       {}", list(&status.pending));
    println!("unknown       {}", list(&status.unknown));
    println!(
        "checksums     {} verified, edited {}, unrecorded {}",
        status.checksums.verified,
        list(&status.checksums.edited),
        list(&status.checksums.unrecorded)
    );
    println!(
        "integrity     {}",
        if status.integrity.is_empty() {
            "-".to_owned()
        } else {
            status.integrity.join("; ")
        }
    );
    println!(
        "sizes         database {}, wal {}, shm {}",
        size(status.sizes.database),
        size(status.sizes.wal),
        size(status.sizes.shm)
    );
}

/// Announces readiness with `PATH.ready-<pid>`, then waits (at most 60 s) for `PATH`.
fn wait_for_barrier(barrier: &Path) -> Result<(), Error> {
    let mut ready = barrier.as_os_str().to_owned();
    ready.push(format!(".ready-{}", std::process::id()));
    std::fs::write(&ready, b"").map_err(|source| Error::Io {
        operation: "create barrier file",
        path: ready.into(),
        source,
    })?;
    let start = Instant::now();
    while !barrier.exists() {
        if start.elapsed() > Duration::from_secs(60) {
            return Err(Error::Invalid {
                what: "barrier",
                reason: format!("{} did not appear within 60 s", barrier.display()),
            });
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}
