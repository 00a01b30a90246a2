//! Checks on the database file before SQLite opens it: a file the layer must not use is
//! refused with its cause named and left byte-for-byte as it was.
//!
//! SQLite reports most of these only as "unable to open database file", or not at all: it
//! opens a read-only file read-only without a word, and takes a file shorter than one page
//! for an empty database (and overwrites it). What SQLite does check under its own locks, at
//! the first read and before anything is written (the header's magic string, a header that
//! records more pages than the file has), it reports as "file is not a database" and
//! "database disk image is malformed", which the layer turns into
//! [`Error::NotADatabase`] and [`Error::Corrupt`] naming the file.
//!
//! The database file itself is never opened here outside SQLite: closing any descriptor of a
//! file releases every POSIX lock this process holds on it, SQLite's included (other
//! connections of this process may hold them), so the checks use `stat` and SQLite's
//! pragmas only.

use std::path::Path;

use super::filesystem::{self, Filesystem};
use crate::error::{Error, FileOperation, Result};
use crate::options::Options;
use crate::sqlite::ffi::sys::writable;
use crate::sqlite::files::{irregular, made_by_a_writer};
use crate::sqlite::side::{side_file, NAME_MAX};

/// SQLite's smallest page size: a database file is at least one page long.
const MIN_PAGE: u64 = 512;

/// The most bytes SQLite or the layer add to the database's name for a file beside it: a new
/// database is made as `.NAME.init` (6 more), which gets a `-wal` (4) when it is put in WAL
/// mode; SQLite's `-journal` adds 8, the write queue's `-lock` 5.
const LONGEST_EXTRA: usize = 10;

/// Everything that can be checked before opening, in order: the path (a directory, a missing
/// parent, a name too long for the side files, a symbolic link to nothing), the filesystem,
/// write access to the directory and the file, and the length of an existing file. Returns
/// whether the file is missing (it is then made whole elsewhere and linked into place, see
/// `init`).
pub(crate) fn prepare(path: &Path, options: &Options) -> Result<bool> {
    // One look at the file (through links), for every check below.
    let meta = regular_or_missing(path)?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.is_dir() {
        return Err(Error::MissingDirectory {
            path: dir.to_owned(),
        });
    }
    if !options.create_if_missing && meta.is_none() {
        return Err(Error::MissingDatabase {
            path: path.to_owned(),
        });
    }
    let name = path.file_name().map_or(0, |name| name.len());
    if name + LONGEST_EXTRA > NAME_MAX {
        return Err(Error::NameTooLong {
            path: path.to_owned(),
            max: NAME_MAX - LONGEST_EXTRA,
        });
    }
    if meta.is_none() {
        if let Ok(link) = std::fs::symlink_metadata(path) {
            if link.file_type().is_symlink() {
                // SQLite would create the file it points to, with the umask's mode, wherever
                // that is: a link planted by someone else decides where the database goes.
                return Err(Error::DanglingSymlink {
                    path: path.to_owned(),
                    target: std::fs::read_link(path).unwrap_or_default(),
                });
            }
        }
    }
    if let Some(fs) = Filesystem::of(dir).map_err(|source| Error::Io {
        operation: FileOperation::FindFilesystem,
        path: dir.to_owned(),
        source,
    })? {
        filesystem::check(path, fs, options.journal_mode)?;
    }
    if !writable(dir) {
        return Err(Error::ReadOnlyDirectory {
            path: dir.to_owned(),
        });
    }
    check_side_files(path, meta.as_ref(), true)?;
    let Some(meta) = meta else {
        return Ok(true);
    };
    if !writable(path) {
        return Err(Error::ReadOnlyFile {
            path: path.to_owned(),
        });
    }
    if (1..MIN_PAGE).contains(&meta.len()) {
        return Err(Error::NotADatabase {
            path: path.to_owned(),
            reason: format!(
                "it is {} bytes long, shorter than the smallest SQLite database (one page of \
                 {MIN_PAGE} bytes)",
                meta.len()
            ),
        });
    }
    Ok(false)
}

/// The database path's metadata (followed through links), `None` if it does not exist;
/// refused if it names a directory, or anything else that is not a regular file: SQLite would
/// write its header over a device's first bytes, or block on a FIFO.
pub(crate) fn regular_or_missing(path: &Path) -> Result<Option<std::fs::Metadata>> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(Error::IsADirectory {
            path: path.to_owned(),
        }),
        Ok(meta) => match irregular(meta.file_type()) {
            Some(kind) => Err(Error::NotAFile {
                path: path.to_owned(),
                kind,
            }),
            None => Ok(Some(meta)),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            operation: FileOperation::ReadMetadata,
            path: path.to_owned(),
            source,
        }),
    }
}

/// SQLite's own files next to the database, which it opens by name: each that exists must be
/// a regular file (a FIFO would make SQLite wait forever, a link would send it elsewhere) that
/// this process may write (another user's makes SQLite fail with "readonly database" or
/// "unable to open database file", without naming the file). `database` is the database
/// file's metadata (`None`: it does not exist). `write: false` (a read-only look, as
/// `Status::read`'s) leaves out the write check.
pub(crate) fn check_side_files(
    path: &Path,
    database: Option<&std::fs::Metadata>,
    write: bool,
) -> Result<()> {
    let mut database = database.cloned();
    for suffix in ["-journal", "-wal", "-shm"] {
        let side = side_file(path, suffix);
        let meta = match std::fs::symlink_metadata(&side) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(Error::Io {
                    operation: FileOperation::ReadMetadata,
                    path: side,
                    source,
                })
            }
        };
        if database.is_none() && suffix != "-shm" && meta.len() > 0 {
            // The database was missing when the caller looked; another process may have made
            // it since, and written this file (512 processes opening a new file at once met
            // that about once in ten storms): look again before calling it left over.
            database = regular_or_missing(path)?;
        }
        let problem = match irregular(meta.file_type()) {
            Some("a symbolic link") => "is a symbolic link",
            Some("a directory") => "is a directory",
            Some("a block device") => "is a block device, not a regular file",
            Some("a character device") => "is a character device, not a regular file",
            Some("a FIFO") => "is a FIFO, not a regular file",
            Some("a socket") => "is a socket, not a regular file",
            Some(_) => "is not a regular file",
            // A WAL or journal left of a database that no longer exists (or planted): SQLite
            // would replay it into the new one.
            None if database.is_none() && suffix != "-shm" && meta.len() > 0 => {
                "is left beside a database that does not exist: remove it (it would be \
                 replayed into the new database)"
            }
            None if write && !writable(&side) && side.exists() => {
                // (A file that vanished meanwhile, as SQLite's transient -journal of another
                // process's transaction does, is no problem.)
                "is not writable by this user"
            }
            // Another user's file beside the database (a sticky directory lets anyone make
            // one): SQLite would replay a planted WAL into the database, and write the
            // database's commits into a file its owner can read.
            None if !made_by_a_writer(&meta, database.as_ref()) => {
                "belongs to a user who may not write the database, or anyone may write it"
            }
            None => continue,
        };
        return Err(Error::SideFile {
            path: side,
            problem,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wal_beside_a_database_made_after_the_first_look_is_not_left_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        std::fs::write(side_file(&path, "-wal"), b"frames").unwrap();
        // Missing when looked at: the WAL is refused as left over...
        match check_side_files(&path, None, true) {
            Err(Error::SideFile { path: p, problem }) => {
                assert_eq!(p, side_file(&path, "-wal"));
                assert!(problem.starts_with("is left beside"), "{problem}");
            }
            other => panic!("expected SideFile, got {other:?}"),
        }
        // ...but once another process has made the database (after the caller's look, which
        // still says missing), the WAL is that database's.
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        check_side_files(&path, None, true).unwrap();
    }
}
