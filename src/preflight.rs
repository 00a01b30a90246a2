//! Checks on the database file before SQLite opens it, so that a file the layer must not use
//! is refused with its cause named and left byte-for-byte as it was.
//!
//! SQLite reports most of these only as "unable to open database file", or not at all: it
//! opens a read-only file read-only without a word, and switching a truncated file to WAL
//! writes to it before anything reads the missing pages.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::filesystem::{self, Filesystem};
use crate::options::Options;

/// The 16 bytes every SQLite database starts with.
const MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// The size of SQLite's database header.
const HEADER: usize = 100;

/// Everything that can be checked before opening, in order: the path (a directory, a missing
/// parent), the filesystem, write access to the directory and the file, and the header of an
/// existing file. Then creates a missing file with [`Options::create_mode`], so that SQLite
/// (which copies the database's mode to `-wal` and `-shm`) never makes a world-readable one.
pub(crate) fn prepare(path: &Path, options: &Options) -> Result<()> {
    let invalid = |reason: String| Error::Invalid {
        what: "database path",
        reason,
    };
    if path.is_dir() {
        return Err(invalid(format!("{} is a directory", path.display())));
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.is_dir() {
        return Err(invalid(format!(
            "the directory {} does not exist",
            dir.display()
        )));
    }
    let io = |operation, path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io {
            operation,
            path,
            source,
        }
    };
    if let Some(fs) = Filesystem::of(dir).map_err(io("find the filesystem of", dir))? {
        filesystem::check(path, fs, options.journal_mode)?;
    }
    if !writable(dir) {
        return Err(Error::ReadOnly {
            path: dir.to_owned(),
            reason: "SQLite creates the database's -wal and -shm (or -journal) files and \
                     this layer its -lock file in that directory",
        });
    }
    match std::fs::metadata(path) {
        Ok(meta) => {
            if !writable(path) {
                return Err(Error::ReadOnly {
                    path: path.to_owned(),
                    reason: "this layer opens databases to write them (and to put them in \
                             WAL mode and migrate them)",
                });
            }
            if meta.len() > 0 {
                check_header(path, meta.len())?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path, options.create_mode),
        Err(source) => Err(io("read metadata of", path)(source)),
    }
}

/// Whether this process may write `path` (its effective ids, as the open will use them).
#[cfg(unix)]
fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: faccessat only reads the NUL-terminated string, which outlives the call.
    unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            libc::W_OK,
            libc::AT_EACCESS,
        ) == 0
    }
}

#[cfg(not(unix))]
fn writable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| !m.permissions().readonly())
}

/// Creates an empty database file (SQLite treats an empty file as a new database) with
/// `mode` exactly, whatever the umask. Another process creating it first is fine.
fn create(path: &Path, mode: u32) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    let io = |operation| {
        move |source| Error::Io {
            operation,
            path: path.to_owned(),
            source,
        }
    };
    match options.open(path) {
        Ok(file) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(io("set the permissions of"))?;
            }
            #[cfg(not(unix))]
            let _ = (file, mode);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(io("create")(source)),
    }
}

/// Reads the header of an existing, non-empty file: it must be SQLite's, with a valid page
/// size, and not shorter than the size the header records. That last check is skipped while
/// a `-wal` or `-journal` file with content exists: recovery from it is SQLite's job, and a
/// checkpoint cut short by a crash legitimately leaves the file shorter than its header says.
fn check_header(path: &Path, len: u64) -> Result<()> {
    let not_a_database = |reason: String| Error::NotADatabase {
        path: path.to_owned(),
        reason,
    };
    if len < HEADER as u64 {
        return Err(not_a_database(format!(
            "it is {len} bytes long, shorter than SQLite's {HEADER}-byte header"
        )));
    }
    let mut header = [0u8; HEADER];
    File::open(path)
        .and_then(|mut file| file.read_exact(&mut header))
        .map_err(|source| Error::Io {
            operation: "read the header of",
            path: path.to_owned(),
            source,
        })?;
    match header_problem(
        &header,
        len,
        has_content(path, "-wal") || has_content(path, "-journal"),
    ) {
        None => Ok(()),
        Some(Problem::NotADatabase(reason)) => Err(not_a_database(reason)),
        Some(Problem::Corrupt(reason)) => Err(Error::Corrupt {
            path: path.to_owned(),
            reason,
        }),
    }
}

enum Problem {
    NotADatabase(String),
    Corrupt(String),
}

fn header_problem(header: &[u8; HEADER], len: u64, recovering: bool) -> Option<Problem> {
    if &header[..16] != MAGIC {
        return Some(Problem::NotADatabase(
            "its header does not start with \"SQLite format 3\" (another kind of file, or an \
             encrypted database)"
                .to_owned(),
        ));
    }
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap());
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        size => u64::from(size),
    };
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Some(Problem::Corrupt(format!(
            "its header gives an invalid page size of {page_size} bytes"
        )));
    }
    // The page count in the header is only valid when "version-valid-for" equals the change
    // counter (older writers did not maintain it); SQLite then trusts it.
    let pages = u64::from(be32(28));
    let valid = be32(92) == be32(24);
    if !recovering && valid && pages > 0 && len < pages * page_size {
        return Some(Problem::Corrupt(format!(
            "it is truncated: its header says {pages} pages of {page_size} bytes ({} bytes), \
             the file has {len} bytes",
            pages * page_size
        )));
    }
    None
}

fn has_content(path: &Path, suffix: &str) -> bool {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    std::fs::metadata(PathBuf::from(name)).is_ok_and(|m| m.len() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(pages: u32, page_size: u16) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[..16].copy_from_slice(MAGIC);
        h[16..18].copy_from_slice(&page_size.to_be_bytes());
        h[24..28].copy_from_slice(&7u32.to_be_bytes());
        h[28..32].copy_from_slice(&pages.to_be_bytes());
        h[92..96].copy_from_slice(&7u32.to_be_bytes());
        h
    }

    #[test]
    fn a_whole_file_passes_and_a_truncated_one_is_corrupt() {
        let h = header(10, 4096);
        assert!(header_problem(&h, 40960, false).is_none());
        assert!(header_problem(&h, 50000, false).is_none(), "longer is fine");
        match header_problem(&h, 8192, false) {
            Some(Problem::Corrupt(reason)) => {
                assert!(
                    reason.contains("truncated") && reason.contains("10 pages"),
                    "{reason}"
                )
            }
            _ => panic!("a truncated file passed"),
        }
        // Recovery from a -wal or -journal may still complete it: SQLite's call.
        assert!(header_problem(&h, 8192, true).is_none());
        // A header whose page count is stale (valid-for differs) is not trusted.
        let mut stale = h;
        stale[92..96].copy_from_slice(&6u32.to_be_bytes());
        assert!(header_problem(&stale, 8192, false).is_none());
        // Page size 1 means 65536.
        assert!(header_problem(&header(2, 1), 131072, false).is_none());
    }

    #[test]
    fn other_files_and_bad_page_sizes_are_named() {
        let mut other = header(1, 4096);
        other[..16].copy_from_slice(b"PK\x03\x04 a zip file.");
        assert!(matches!(
            header_problem(&other, 4096, false),
            Some(Problem::NotADatabase(_))
        ));
        for size in [0u16, 100, 1000, 256] {
            assert!(
                matches!(header_problem(&header(1, size), 65536, false), Some(Problem::Corrupt(r)) if r.contains("page size")),
                "{size}"
            );
        }
    }
}
