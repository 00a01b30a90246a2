//! Verified online backup: a copy taken while other processes write, that either exists
//! complete and valid or does not exist.
//!
//! `cp` of a live database copies pages from different moments (and misses what is still in
//! `-wal`). `VACUUM INTO` writes a consistent snapshot instead: it is a read transaction, so
//! under WAL the writers go on meanwhile. The copy is written next to the destination under
//! a temporary name, synced, checked with `integrity_check`, and only then linked into place
//! (which fails rather than replace a file that appeared meanwhile); the directory is synced
//! last. A process killed on the way leaves at most the temporary file, never a partial
//! backup at the destination; the next backup to that destination removes it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::sql_types::Text;
use diesel::{sql_query, Connection, QueryableByName, RunQueryDsl, SqliteConnection};

use crate::error::{Error, FileOperation, Operation, Result};
use crate::operation::DB_SYSTEM;
use crate::retry::{retry_locked, SystemClock};
use crate::sqlite::database::Database;
use crate::sqlite::files::create_like;
use crate::sqlite::side::{remove_with_side_files, NAME_MAX};

/// A backup [`Database::backup_to`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backup {
    /// The backup file, absolute.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// From asking for the backup until it was in place.
    pub elapsed: Duration,
}

#[derive(QueryableByName)]
struct Check {
    #[diesel(sql_type = Text)]
    integrity_check: String,
}

impl Database {
    /// Writes a consistent copy of the database to `destination`, a file that must not exist,
    /// while other connections and processes go on writing. The copy holds every transaction
    /// committed before the backup began; it is synced and passes `PRAGMA integrity_check`
    /// before it appears at `destination`, atomically. Restoring is opening the copy.
    ///
    /// The copy is compacted (`VACUUM INTO`) and in rollback-journal mode; opening it with
    /// this layer puts it back in WAL. Under WAL, a long backup holds back checkpoints, so
    /// `-wal` grows while it runs. The copy is never more readable than the database: it
    /// gets the database's permission bits whatever the umask (without the group's, if its
    /// group cannot be the database's), and as root the database's owner and group.
    ///
    /// # Errors
    /// [`Error::BackupExists`] if `destination` exists (it is left as it is);
    /// [`Error::InvalidPath`], [`Error::MissingDirectory`]; [`Error::NameTooLong`] if the
    /// name leaves no room for the temporary's (218 bytes at most); [`Error::Busy`] if the database
    /// stayed locked; [`Error::Storage`] or [`Error::Io`] if the copy could not be written,
    /// synced or linked into place; [`Error::Corrupt`] if the copy does not pass
    /// `integrity_check`; [`Error::Reentrant`] inside a `write` or `read` of this database on
    /// this thread. On every error, nothing is left at `destination` or beside it.
    pub fn backup_to(&self, destination: impl AsRef<Path>) -> Result<Backup> {
        let started = Instant::now();
        let destination = destination.as_ref();
        let invalid = |reason| Error::InvalidPath {
            path: destination.to_owned(),
            reason,
        };
        let text = destination
            .to_str()
            .ok_or_else(|| invalid("is not valid UTF-8"))?;
        if text.is_empty() || text.contains(['\0', '?', '#']) {
            return Err(invalid("cannot name a backup file"));
        }
        let destination = std::path::absolute(destination).map_err(|source| Error::Io {
            operation: FileOperation::ResolvePath,
            path: destination.to_owned(),
            source,
        })?;
        if std::fs::symlink_metadata(&destination).is_ok() {
            return Err(Error::BackupExists { path: destination });
        }
        let dir = destination.parent().unwrap_or(Path::new("/")).to_owned();
        if !dir.is_dir() {
            return Err(Error::MissingDirectory { path: dir });
        }
        let name = destination.file_name().map_or(0, |name| name.len());
        if name + TEMPORARY_EXTRA > NAME_MAX {
            return Err(Error::NameTooLong {
                path: destination,
                max: NAME_MAX - TEMPORARY_EXTRA,
            });
        }
        remove_stale_temporaries(&destination);
        let temporary = temporary_beside(&destination);
        let written = self
            .copy_to(&temporary)
            .and_then(|()| verify(&temporary))
            .and_then(|()| place(&temporary, &destination, &dir));
        // Whatever happened, the temporary name and the journal SQLite may have left beside
        // it (a full disk stops VACUUM INTO with its journal written) are gone; the copy is
        // linked into place on success.
        remove_with_side_files(&temporary);
        written?;
        let bytes = std::fs::metadata(&destination).map_or(0, |m| m.len());
        let elapsed = started.elapsed();
        tracing::info!(
            db.system.name = DB_SYSTEM,
            db.namespace = %crate::escaped::Escaped::path(self.path()),
            db.operation.name = Operation::Backup.as_str(),
            operation = Operation::Backup.as_str(),
            backup = %crate::escaped::Escaped::path(&destination),
            bytes,
            elapsed_ms = elapsed.as_millis() as u64,
            "backup written"
        );
        Ok(Backup {
            path: destination,
            bytes,
            elapsed,
        })
    }

    /// `VACUUM INTO` the temporary file, retried while the database is locked (WAL recovery
    /// after a crash, or a writer in rollback-journal mode). The file is created first, no
    /// more readable than the database (`VACUUM INTO` takes an empty file; it would create
    /// one with the umask's mode).
    fn copy_to(&self, temporary: &Path) -> Result<()> {
        let quoted = temporary
            .to_str()
            .expect("checked UTF-8")
            .replace('\'', "''");
        let like = std::fs::metadata(self.path()).ok();
        let create = || -> Result<()> {
            // A failed attempt may leave a partial file, which VACUUM INTO refuses.
            remove_with_side_files(temporary);
            if let Some(like) = &like {
                create_like(temporary, like).map_err(|source| Error::Io {
                    operation: FileOperation::WriteBackup,
                    path: temporary.to_owned(),
                    source,
                })?;
            }
            Ok(())
        };
        self.with_connection(Operation::Backup, |conn| {
            retry_locked(
                &self.options().retry,
                &SystemClock,
                Operation::Backup,
                self.path(),
                |_| {
                    create()?;
                    conn.batch_execute(&format!("VACUUM INTO '{quoted}'"))
                        .map_err(|source| Error::query(Operation::Backup, source))
                },
            )
            .map(drop)
        })
    }
}

/// What the temporary's journal adds to the destination's name: `.`, `.backup-`, a pid of up
/// to 10 digits, `-`, up to 9 digits of nanoseconds, `-journal`.
const TEMPORARY_EXTRA: usize = 1 + 8 + 10 + 1 + 9 + 8;

/// `.<name>.backup-<pid>-<nanos>` in the destination's directory: the same filesystem, so
/// that linking it into place is atomic, and a name no other run uses.
fn temporary_beside(destination: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = destination
        .file_name()
        .map_or_else(|| "backup".into(), |n| n.to_string_lossy());
    destination.with_file_name(format!(".{name}.backup-{}-{nanos}", std::process::id()))
}

/// Removes the temporary files that backups to `destination` by processes that no longer
/// exist (killed on the way) left beside it. A live process's file is left alone.
fn remove_stale_temporaries(destination: &Path) {
    let (Some(dir), Some(name)) = (destination.parent(), destination.file_name()) else {
        return;
    };
    let prefix = format!(".{}.backup-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if crate::sqlite::ffi::sys::process_gone(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Syncs the copy and checks it. Opened `immutable`: nothing else uses it, and no `-wal` or
/// `-shm` is made beside it.
fn verify(temporary: &Path) -> Result<()> {
    let io = |source| Error::Io {
        operation: FileOperation::WriteBackup,
        path: temporary.to_owned(),
        source,
    };
    std::fs::File::open(temporary)
        .and_then(|file| file.sync_all())
        .map_err(io)?;
    let url = format!(
        "file://{}?mode=ro&immutable=1",
        temporary
            .to_str()
            .expect("checked UTF-8")
            .replace('%', "%25")
    );
    let mut conn = SqliteConnection::establish(&url).map_err(|source| Error::Open {
        path: temporary.to_owned(),
        source,
    })?;
    let findings: Vec<String> = sql_query("PRAGMA integrity_check")
        .load::<Check>(&mut conn)
        .map_err(|source| Error::query(Operation::Backup, source))?
        .into_iter()
        .map(|row| row.integrity_check)
        .collect();
    if findings != ["ok"] {
        return Err(Error::Corrupt {
            path: temporary.to_owned(),
            reason: format!("the copy fails integrity_check: {}", findings.join("; ")),
        });
    }
    Ok(())
}

/// Links the checked copy to `destination` (failing, not replacing, if a file appeared
/// there meanwhile), then syncs the directory so that the new name survives a power loss.
fn place(temporary: &Path, destination: &Path, dir: &Path) -> Result<()> {
    match std::fs::hard_link(temporary, destination) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::BackupExists {
                path: destination.to_owned(),
            })
        }
        Err(source) => {
            return Err(Error::Io {
                operation: FileOperation::WriteBackup,
                path: destination.to_owned(),
                source,
            })
        }
    }
    std::fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| {
            // Not durable: do not leave a backup that may vanish with a power loss.
            let _ = std::fs::remove_file(destination);
            Error::Io {
                operation: FileOperation::WriteBackup,
                path: dir.to_owned(),
                source,
            }
        })
}
