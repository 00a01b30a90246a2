//! The commands, and what they share.

pub mod backup;
pub mod migrate;
pub mod record;
pub mod soak;
pub mod status;
pub mod stress;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diesel_migrations::FileBasedMigrations;

use crate::error::{Error, Result};

/// The database a command works on: `--db PATH`, else `$DATABASE_URL`, else `catalog.db`.
/// The library reads the URL forms (`sqlite://PATH`, `sqlite:PATH`, `file:PATH`) and, with
/// the `postgres` feature, PostgreSQL's (`postgres://`, `postgresql://`).
pub fn database_path(cli_db: Option<PathBuf>) -> PathBuf {
    cli_db.unwrap_or_else(|| match std::env::var_os("DATABASE_URL") {
        Some(url) if !url.is_empty() => PathBuf::from(url),
        _ => PathBuf::from("catalog.db"),
    })
}

/// Whether `--transaction-pooling` declared that the PostgreSQL URL leads to a transaction
/// pooler.
static TRANSACTION_POOLING: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// `--transaction-pooling`: the PostgreSQL URL leads to a transaction pooler (PgBouncer's
/// `pool_mode = transaction`); every PostgreSQL open of this process declares it (see
/// [`pg_options`]), and `stress` passes it to its processes.
pub fn declare_transaction_pooling() {
    TRANSACTION_POOLING.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`declare_transaction_pooling`] was called.
pub fn transaction_pooling_declared() -> bool {
    TRANSACTION_POOLING.load(std::sync::atomic::Ordering::Relaxed)
}

/// `options` for a PostgreSQL URL: with `Options::transaction_pooling(true)` if
/// `--transaction-pooling` declared a pooler, else as they are (an undeclared transaction
/// pooler is refused at open).
#[cfg(feature = "postgres")]
pub fn pg_options(options: sqlite_persistence::Options) -> sqlite_persistence::Options {
    if transaction_pooling_declared() {
        options.transaction_pooling(true)
    } else {
        options
    }
}

/// The PostgreSQL URL `db` names, if it names one (by its scheme, as the library decides).
///
/// # Errors
/// A URL of a scheme this build does not open.
pub fn postgres_url(db: &Path) -> Result<Option<String>> {
    let text = db.to_string_lossy();
    match sqlite_persistence::Engine::of(&text)? {
        sqlite_persistence::Engine::Sqlite => Ok(None),
        _ => Ok(Some(text.into_owned())),
    }
}

/// A command that works on SQLite files only, refused for a PostgreSQL URL.
///
/// # Errors
/// [`Error::Usage`] for a PostgreSQL URL.
pub fn sqlite_only(db: &Path, command: &'static str) -> Result<()> {
    match postgres_url(db)? {
        None => Ok(()),
        Some(_) => Err(Error::Usage {
            what: command,
            reason: "it works on SQLite files; PostgreSQL has its own tools (pg_dump, \
                     pg_stat_activity)"
                .to_owned(),
        }),
    }
}

/// A Diesel migrations directory, as `diesel migration` lays it out.
pub fn migration_dir(dir: &Path) -> Result<FileBasedMigrations> {
    FileBasedMigrations::from_path(dir).map_err(|source| {
        sqlite_persistence::Error::MigrationSource {
            source: Box::new(source),
        }
        .into()
    })
}

/// Runs `run` on a fresh database: `--db PATH` (which must not exist, nor its plain side's
/// `PATH-plain`, nor their side files), else `NAME` in a new private temporary directory,
/// removed afterwards.
/// Never `$DATABASE_URL`: a load test must not touch a real database. SIGINT and SIGTERM stop
/// the run's processes and still remove the directory.
pub fn on_fresh_db<T>(
    db: Option<PathBuf>,
    name: &str,
    run: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    crate::harness::interrupt::catch();
    let (dir, db) = match db {
        Some(db) => (None, std::path::absolute(&db).unwrap_or(db)),
        None => {
            let dir = private_temp_dir(name)?;
            let db = dir.join(format!("{name}.db"));
            (Some(dir), db)
        }
    };
    // The database files and what SQLite and the queue keep beside them: a left-over `-wal`
    // is refused by the run's processes, and the run's cleanup must not remove it after.
    let files = [db.clone(), plain_path(&db)]
        .into_iter()
        .flat_map(|base| ["", "-wal", "-journal", "-shm", "-lock"].map(|s| side_path(&base, s)));
    let result = match files
        .into_iter()
        .find(|p| std::fs::symlink_metadata(p).is_ok())
    {
        Some(existing) => Err(Error::Usage {
            what: "database path",
            reason: format!("{} exists; {name} needs a fresh file", existing.display()),
        }),
        None => run(&db),
    };
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

/// A new directory only this user may enter, whatever the umask, named for `name`, this
/// process and the time (never one left by an earlier run).
pub fn private_temp_dir(name: &str) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "sqlite-persistence-{name}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|source| Error::Io {
            operation: "create",
            path: dir.clone(),
            source,
        })?;
    Ok(dir)
}

/// `db` with `suffix` added to its name, as SQLite and the fair queue name their files
/// beside it (`-wal`, `-lock`, ...).
pub fn side_path(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The plain side's database next to `db`.
pub fn plain_path(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}-plain", db.display()))
}

/// `Ok` for a clean run of `what`, else [`Error::NotClean`].
pub fn clean_or_error(what: &'static str, clean: bool) -> Result<()> {
    if clean {
        Ok(())
    } else {
        Err(Error::NotClean { what })
    }
}

/// Announces readiness with `PATH.ready-<pid>`, then waits (at most 60 s) for `PATH`.
///
/// It looks every 200 us at first, then less often, up to every 5 ms: a thousand processes
/// looking every 500 us kept two cores busy while the harness was still starting the rest,
/// so that it took the first ones past their 60 s (a third of a 1,024-process storm failed
/// that way). Those that wait longest start up to 5 ms late.
pub fn wait_for_barrier(barrier: &Path) -> Result<()> {
    let mut ready = barrier.as_os_str().to_owned();
    ready.push(format!(".ready-{}", std::process::id()));
    std::fs::write(&ready, b"").map_err(|source| Error::Io {
        operation: "create barrier file",
        path: ready.into(),
        source,
    })?;
    let start = Instant::now();
    let mut pause = Duration::from_micros(200);
    while !barrier.exists() {
        if start.elapsed() > Duration::from_secs(60) {
            return Err(Error::Run {
                reason: format!(
                    "the barrier {} did not appear within 60 s",
                    barrier.display()
                ),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
    Ok(())
}
