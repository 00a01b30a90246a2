//! `sqlite-persistence`: parse, set up logging, dispatch. The commands live in the
//! `sqlite_persistence_cli` library of this package.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use sqlite_persistence_cli::commands::{self, database_path, wait_for_barrier};
use sqlite_persistence_cli::error::{error_chain, Error};

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

    /// The PostgreSQL URL leads to a transaction pooler (PgBouncer's `pool_mode =
    /// transaction`): keep no state in the server's session. Without it such a pooler is
    /// refused.
    #[arg(long, global = true)]
    transaction_pooling: bool,

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
        /// Use the lean hand-written setup instead of this crate (one connection,
        /// `immediate_transaction`: the baseline for one process's speed).
        #[arg(long, hide = true, conflicts_with = "plain")]
        lean: bool,
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
        /// This crate's side without its write queue (`record --no-fair-queue`).
        #[arg(long)]
        no_fair_queue: bool,
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
        /// Also back this crate's side up this often during the run, and check that each
        /// backup holds every write acknowledged before it began.
        #[arg(long, value_name = "MS")]
        backup_every_ms: Option<u64>,
        /// One JSON object with every figure.
        #[arg(long)]
        json: bool,
    },
    /// Write a verified copy of the database to a new file while other processes go on
    /// writing: a consistent snapshot, synced and integrity-checked before it appears.
    Backup {
        /// The backup file; it must not exist.
        #[arg(long, value_name = "PATH")]
        to: PathBuf,
        /// One JSON object: path, bytes, elapsed_ms.
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
    // A file-size limit (ulimit -f) then fails the write that meets it, which SQLite reports
    // and the layer turns into a storage error, instead of killing the process unannounced.
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            if let Some(hint) = error.hint() {
                eprintln!("hint: {hint}");
            }
            match error {
                // As a shell reports a process ended by SIGINT.
                Error::Interrupted => ExitCode::from(130),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Logs go to stderr; `SQLITE_PERSISTENCE_LOG` sets the filter (`warn` shows every retry,
/// `info` migrations, `debug` each migration). Defaults to warnings (a WAL pinned by a
/// reader, named; a long wait for the write queue, naming its holder), without the one
/// each retry logs, which only `SQLITE_PERSISTENCE_LOG=warn` shows.
fn init_logging() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    let filter = std::env::var("SQLITE_PERSISTENCE_LOG")
        .ok()
        .and_then(|spec| spec.parse::<Targets>().ok())
        .unwrap_or_else(|| {
            Targets::new()
                .with_default(LevelFilter::WARN)
                .with_target("sqlite_persistence::retry", LevelFilter::ERROR)
        });
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}

fn run(cli: Cli) -> Result<(), Error> {
    if cli.transaction_pooling {
        // Said of a PostgreSQL URL only: a careless flag on a SQLite file is refused, not
        // ignored.
        let target = match cli.command {
            Command::Stress { .. } | Command::Soak { .. } => cli.db.clone(),
            _ => Some(database_path(cli.db.clone())),
        };
        let postgres = match &target {
            Some(db) => commands::postgres_url(db)?.is_some(),
            None => false,
        };
        if !postgres {
            return Err(Error::Usage {
                what: "--transaction-pooling",
                reason: "it declares a transaction pooler in front of a PostgreSQL server; \
                         the database is a SQLite file"
                    .to_owned(),
            });
        }
        commands::declare_transaction_pooling();
    }
    match cli.command {
        Command::Stress {
            processes,
            writes,
            hold_ms,
            compare,
            no_fair_queue,
            json,
        } => {
            let load = commands::stress::Load {
                processes,
                writes,
                hold_ms,
                fair_queue: !no_fair_queue,
            };
            return commands::stress::run(cli.db, load, compare, json);
        }
        Command::Soak {
            processes,
            seconds,
            compare,
            backup_every_ms,
            json,
        } => {
            let backup_every = backup_every_ms.map(|ms| Duration::from_millis(ms.max(1)));
            return commands::soak::run(cli.db, processes, seconds, compare, backup_every, json);
        }
        _ => {}
    }
    let path = database_path(cli.db);
    if let Some(barrier) = &cli.barrier {
        wait_for_barrier(barrier)?;
    }
    let started = Instant::now();
    match cli.command {
        Command::Migrate { migrations, plain } => {
            commands::migrate::run(&path, migrations.as_deref(), plain)
        }
        Command::Record {
            artifact,
            count,
            hold_ms,
            json,
            no_fair_queue,
            plain,
            lean,
        } => {
            let args = commands::record::Args {
                artifact,
                count,
                hold: Duration::from_millis(hold_ms),
                json,
                no_fair_queue,
                plain,
                lean,
            };
            commands::record::run(&path, &args, started)
        }
        Command::SoakWorker { seconds, plain } => commands::soak::work(&path, seconds, plain),
        Command::Backup { to, json } => commands::backup::run(&path, &to, json),
        Command::Status { migrations, json } => {
            commands::status::run(&path, migrations.as_deref(), json)
        }
        Command::Stress { .. } | Command::Soak { .. } => unreachable!("handled above"),
    }
}
