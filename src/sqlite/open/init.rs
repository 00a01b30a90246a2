//! A new database appears whole or not at all.
//!
//! Creating the file at its path and migrating it there left, when the first migration batch
//! failed (or the process died in it), an empty database with its `-wal`, `-shm` and `-lock`
//! beside it: a refusal that changed the file system. Deleting them afterwards is no remedy:
//! another process may have opened the new file meanwhile, and would go on writing into a
//! file that no longer has a name.
//!
//! So a missing database is made under a private name beside it, `.<name>.init`: created
//! exclusively (`O_EXCL`, never through a link) with [`Options::create_mode`], put in the
//! journal mode the options ask for and migrated, closed (which checkpoints and removes its
//! own `-wal`), synced, and only then linked to the database's path (`link(2)`, which fails
//! rather than replace a file that appeared meanwhile), the directory synced. A failure
//! removes the private file and its side files: the directory is as it was.
//!
//! The makers of new databases in one directory take turns on the directory's `flock`
//! (within the open's deadline); one that finds the database linked when its turn comes
//! uses it. A maker that died left its private file, and the kernel released its turn: the
//! next maker removes the file (whatever a power loss left in it: the name is the layer's,
//! as `-journal` is SQLite's) and makes the database itself.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diesel::sqlite::Sqlite;
use diesel::{Connection, SqliteConnection};

use super::{wal, Access, Target};
use crate::error::{Error, FileOperation, Operation, Result};
use crate::migrate::Source;
use crate::options::Options;
use crate::pragma::JournalMode;
use crate::sqlite::customizer::ConnectionCustomizer;
use crate::sqlite::side::{remove_with_side_files, side_file};

/// The longest an open waits for another process making the database (a deadline of
/// `Duration::MAX` would overflow an instant).
pub(super) const LONGEST_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// The longest pause between two looks at another process's lock on the private file.
const MAX_POLL: Duration = Duration::from_millis(20);

/// What [`make`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Made {
    /// This process made the database and linked it into place; the names applied.
    Here(Vec<String>),
    /// Another process did (or the path appeared by other means).
    Elsewhere,
}

/// Makes the missing database at `target`, or waits for the process making it, until
/// `deadline` (an instant); see the module's docs.
///
/// # Errors
/// As the open's first migration batch ([`Error::Migration`], [`Error::TransactionControl`],
/// [`Error::Storage`], ...); [`Error::Io`] if the private file cannot be created, synced or
/// linked; [`Error::Busy`] if another process was still making it at the deadline.
pub(super) fn make(
    target: &Target,
    options: &Options,
    source: &Source<Sqlite>,
    started: Instant,
    deadline: Instant,
) -> Result<Made> {
    let path = target.path();
    let dir = path.parent().unwrap_or(Path::new("/"));
    let private = private_name(path);
    let io = |operation, at: &Path| {
        let at = at.to_owned();
        move |source| Error::Io {
            operation,
            path: at,
            source,
        }
    };
    if path.exists() {
        return Ok(Made::Elsewhere);
    }
    // The makers of a directory's new databases take turns on the directory's own `flock`:
    // never a lock on the new file itself, whose descriptor, once closed, would drop every
    // POSIX lock this process's SQLite connections hold on it after it is linked into
    // place. A directory this user may not read gives no descriptor: its makers do not
    // take turns, and `link` alone keeps one of them from replacing another's database.
    let turn = File::open(dir).ok();
    if let Some(turn) = &turn {
        let mut pause = Duration::from_millis(1);
        loop {
            match turn.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(source)) => {
                    return Err(io(FileOperation::LockQueue, dir)(source))
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Busy {
                    operation: Operation::Migrate,
                    attempts: 1,
                    elapsed: now.saturating_duration_since(started),
                    source: Box::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "another process was still creating a database in its directory",
                    )),
                    holders: Vec::new(),
                });
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(MAX_POLL);
        }
    }
    if path.exists() {
        return Ok(Made::Elsewhere);
    }
    // Without turns (a directory this user may not read), another maker may be at work: its
    // files are never removed; wait for it to finish (or the deadline).
    let wait_for_other = || -> Result<Option<Made>> {
        let mut pause = Duration::from_millis(1);
        while std::fs::symlink_metadata(&private).is_ok() && !path.exists() {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::SideFile {
                    path: private.clone(),
                    problem: "stayed: another process makes the database under this name, \
                              or one that died left it (remove it if none runs)",
                });
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(MAX_POLL);
        }
        Ok(path.exists().then_some(Made::Elsewhere))
    };
    if turn.is_none() && std::fs::symlink_metadata(&private).is_ok() {
        if let Some(made) = wait_for_other()? {
            return Ok(made);
        }
    }
    // With the turn, a maker that died (the kernel released its turn) left its file, with
    // whatever a power loss left of it: the name is the layer's, as `-journal` is SQLite's,
    // and the file is removed (a link is removed, never followed).
    if turn.is_some() && std::fs::symlink_metadata(&private).is_ok() {
        if let Err(source) = std::fs::remove_file(&private) {
            return Err(Error::SideFile {
                path: private,
                problem: if source.kind() == std::io::ErrorKind::PermissionDenied {
                    "is in the way, and this user may not remove it: a new database is made \
                     under this name"
                } else {
                    "is in the way, and cannot be removed: a new database is made under this \
                     name"
                },
            });
        }
        remove_with_side_files(&private);
    }
    // Closed before SQLite opens the file: no descriptor of the layer's is ever closed on
    // it while SQLite has it open.
    match create_private(&private, options.create_mode) {
        Ok(file) => drop(file),
        // Only without turns: another maker came first.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return match wait_for_other()? {
                Some(made) => Ok(made),
                None => Err(io(FileOperation::Create, &private)(e)),
            };
        }
        Err(source) => return Err(io(FileOperation::Create, &private)(source)),
    }
    // What SQLite would open beside the private file must be gone (a FIFO there would block
    // it, another user's file be used): a dead maker's, now that the name is this one's.
    for suffix in ["-journal", "-wal", "-shm"] {
        let side = side_file(&private, suffix);
        if std::fs::symlink_metadata(&side).is_ok() && std::fs::remove_file(&side).is_err() {
            let _ = std::fs::remove_file(&private);
            return Err(Error::SideFile {
                path: side,
                problem: "is in the way, and this user may not remove it: a new database is \
                          made beside it",
            });
        }
    }
    let made = initialize(&private, target, options, source).and_then(|applied| {
        publish(&private, path).map(|linked| match linked {
            true => Made::Here(applied),
            false => Made::Elsewhere,
        })
    });
    remove_with_side_files(&private);
    drop(turn);
    made
}

/// Removes what a maker that died left beside the existing database at `path` (the database
/// was then made by other means), if no maker of the directory is at work: one `stat` when
/// there is nothing.
pub(super) fn remove_stale(path: &Path) {
    let private = private_name(path);
    if std::fs::symlink_metadata(&private).is_err() {
        return;
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    if let Ok(turn) = File::open(dir) {
        if turn.try_lock().is_ok() {
            remove_with_side_files(&private);
        }
    }
}

/// `.<name>.init` beside `path`.
fn private_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "database".into(), |n| n.to_string_lossy());
    path.with_file_name(format!(".{name}.init"))
}

/// Creates the private file with `mode` exactly, never through a link.
fn create_private(private: &Path, mode: u32) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(private)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(file)
}

/// Puts the private file in the options' journal mode and applies the migrations, on a
/// connection of its own, closed (and so checkpointed) before this returns.
fn initialize(
    private: &Path,
    target: &Target,
    options: &Options,
    source: &Source<Sqlite>,
) -> Result<Vec<String>> {
    let named = Target::new(private)?;
    let mut conn = SqliteConnection::establish(&named.url(Access::Create))
        .map_err(|source| Error::open_failed(target.path(), source))?;
    ConnectionCustomizer::new(options).apply(&mut conn)?;
    let query = |operation| move |source| Error::query(operation, source);
    // The batch's rollback journal in memory: no `-journal` beside the private file (whose
    // name is longer than the database's), and a failed batch discards the file anyway.
    wal::switch(&mut conn, JournalMode::Memory).map_err(query(Operation::SwitchJournalMode))?;
    let applied = conn.immediate_transaction(|conn| source.apply(conn, target, options))?;
    // Only WAL is recorded in the file; the rollback modes are each connection's own.
    if options.journal_mode == JournalMode::Wal {
        let mode = wal::switch(&mut conn, options.journal_mode)
            .map_err(query(Operation::SwitchJournalMode))?;
        if JournalMode::parse(&mode) != Some(options.journal_mode) {
            return Err(Error::JournalMode {
                path: target.path().to_owned(),
                expected: options.journal_mode,
                actual: JournalMode::parse(&mode).unwrap_or(JournalMode::Delete),
            });
        }
    }
    drop(conn);
    Ok(applied)
}

/// Syncs the private file, links it to `path` and syncs the directory; `false` if a file
/// appeared at `path` meanwhile (it is left alone).
fn publish(private: &Path, path: &Path) -> Result<bool> {
    let io = |at: &Path| {
        let at = at.to_owned();
        move |source| Error::Io {
            operation: FileOperation::Create,
            path: at,
            source,
        }
    };
    File::open(private)
        .and_then(|file| file.sync_all())
        .map_err(io(private))?;
    match std::fs::hard_link(private, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(source) => return Err(io(path)(source)),
    }
    // A directory this user may not read cannot be opened to sync: the new name is then as
    // durable as the filesystem makes it on its own.
    let dir = path.parent().unwrap_or(Path::new("/"));
    match File::open(dir) {
        Ok(dir_file) => dir_file.sync_all().map_err(io(dir))?,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
        Err(source) => return Err(io(dir)(source)),
    }
    Ok(true)
}
