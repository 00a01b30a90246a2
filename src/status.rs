//! What a database file looks like, read without creating, migrating or locking it for writes.

use std::path::{Path, PathBuf};

use diesel::migration::MigrationSource;
use diesel::sqlite::Sqlite;
use diesel::{Connection, SqliteConnection};

use crate::customizer::ConnectionCustomizer;
use crate::database::database_url;
use crate::error::{Error, Result};
use crate::migrate::{applied_versions, plan, Migrations};
use crate::options::Options;
use crate::retry::{retry_locked, SystemClock};
use crate::wal::read_journal_mode;

/// Sizes in bytes of a database's files; `None` where the file does not exist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileSizes {
    /// The database file.
    pub database: Option<u64>,
    /// The write-ahead log (`-wal`).
    pub wal: Option<u64>,
    /// The WAL index (`-shm`).
    pub shm: Option<u64>,
}

/// A database's state as [`Status::read`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// The database file, absolute.
    pub path: PathBuf,
    /// Whether the file exists (a missing one is not created).
    pub exists: bool,
    /// The journal mode in force, as SQLite names it; `None` if the file does not exist.
    pub journal_mode: Option<String>,
    /// Versions recorded as applied, ascending.
    pub applied: Vec<String>,
    /// Names of the known migrations not applied yet, in the order they would run.
    pub pending: Vec<String>,
    /// Applied versions the migration source does not know.
    pub unknown: Vec<String>,
    /// The files' sizes.
    pub sizes: FileSizes,
}

impl Status {
    /// Reads the state of the database at `path` against `migrations`, without creating the
    /// file, switching its journal mode or applying anything.
    ///
    /// # Errors
    /// [`Error::MigrationSource`], [`Error::InvalidPath`], [`Error::Open`]; [`Error::Query`]
    /// when the file is not a database; [`Error::Busy`] if it stayed locked.
    pub fn read<S: MigrationSource<Sqlite>>(
        path: impl AsRef<Path>,
        migrations: S,
        options: &Options,
    ) -> Result<Self> {
        let migrations: Migrations = migrations
            .migrations()
            .map_err(|source| Error::MigrationSource { source })?;
        let path = std::path::absolute(path.as_ref()).map_err(|source| Error::Io {
            operation: "resolve the path of",
            path: path.as_ref().to_owned(),
            source,
        })?;
        let sizes = FileSizes {
            database: file_size(&path, "")?,
            wal: file_size(&path, "-wal")?,
            shm: file_size(&path, "-shm")?,
        };
        let mut status = Status {
            exists: sizes.database.is_some(),
            path,
            journal_mode: None,
            applied: Vec::new(),
            pending: Vec::new(),
            unknown: Vec::new(),
            sizes,
        };
        let applied = if status.exists {
            let mut conn = SqliteConnection::establish(&database_url(&status.path, "rw")?)
                .map_err(|source| Error::Open {
                    path: status.path.clone(),
                    source,
                })?;
            let (mode, applied) =
                retry_locked(&options.retry, &SystemClock, "read status", |_| {
                    ConnectionCustomizer::new(options).apply(&mut conn)?;
                    Ok::<_, Error>((read_journal_mode(&mut conn)?, applied_versions(&mut conn)?))
                })?
                .value;
            status.journal_mode = Some(mode);
            applied
        } else {
            Default::default()
        };
        let plan = plan(&migrations, &applied);
        status.pending = plan.pending.iter().map(|m| m.name().to_string()).collect();
        status.unknown = plan.unknown;
        status.applied = applied.into_iter().collect();
        Ok(status)
    }
}

fn file_size(path: &Path, suffix: &str) -> Result<Option<u64>> {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    let file = PathBuf::from(name);
    match std::fs::metadata(&file) {
        Ok(meta) => Ok(Some(meta.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            operation: "read metadata of",
            path: file,
            source,
        }),
    }
}
