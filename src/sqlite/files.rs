//! Files the layer opens or reads itself (the write queue's `-lock`, `/proc/locks`,
//! `/proc/PID/comm`), and what a path that is not a regular file is: nothing the layer opens
//! may block it (a FIFO planted in place of a file would, without bound), follow a link
//! someone else planted, or be a device whose bytes SQLite would overwrite.

use std::fs::{File, FileType, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What a file that is not a regular one is, as errors say it (`a FIFO`); `None` for a
/// regular file. A symbolic link counts as one only where it was not followed.
pub(crate) fn irregular(file_type: FileType) -> Option<&'static str> {
    Some(if file_type.is_file() {
        return None;
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    })
}

/// Whether a file beside a database (`meta`) is the database's: made by this user, by the
/// database's owner, or by a member of its group where the group may write it; and no more
/// writable than the database. A sticky directory lets anyone make a file there: another
/// user's `-wal` would be replayed into the database, another user's `-lock` held to stop
/// its writers.
pub(crate) fn made_by_a_writer(
    meta: &std::fs::Metadata,
    database: Option<&std::fs::Metadata>,
) -> bool {
    use std::os::unix::fs::MetadataExt;
    let by_writer = meta.uid() == crate::sqlite::ffi::sys::effective_uid()
        || database.is_some_and(|db| {
            db.uid() == meta.uid() || (db.mode() & 0o020 != 0 && db.gid() == meta.gid())
        });
    let open_to_all = meta.mode() & 0o002 != 0 && database.is_none_or(|db| db.mode() & 0o002 == 0);
    by_writer && !open_to_all
}

/// `path` open for reading (or for writing), if it is a regular file: never through a
/// symbolic link, never blocking, never creating it.
pub(crate) fn open_regular(path: &Path, write: bool) -> std::io::Result<File> {
    open_regular_for(path, !write, write)
}

/// [`open_regular`], for reading, writing or both.
pub(crate) fn open_regular_for(path: &Path, read: bool, write: bool) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(read)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    match irregular(file.metadata()?.file_type()) {
        None => Ok(file),
        Some(kind) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {kind}, not a regular file"),
        )),
    }
}

/// The text of the regular file `path` (a kernel's `/proc` file counts as one), at most
/// `limit` bytes of it; opened as [`open_regular`] does, so that a FIFO mounted or linked in
/// its place fails at once instead of blocking.
pub(crate) fn read_regular(path: &Path, limit: u64) -> std::io::Result<String> {
    let mut text = String::new();
    open_regular(path, false)?
        .take(limit)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// Creates `path` (which must not exist, nor be a link) no more readable than a file whose
/// metadata is `like`: its permission bits whatever the umask (and no ACL inherited from the
/// directory), and its owner and group when this process is root. Elsewhere the new file is this user's: if its group is not `like`'s
/// and cannot be made so, it gets no group permissions.
pub(crate) fn create_like(path: &Path, like: &std::fs::Metadata) -> std::io::Result<File> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut mode = like.mode() & 0o666;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode & 0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let made = (|| {
        if crate::sqlite::ffi::sys::is_root() {
            std::os::unix::fs::fchown(&file, Some(like.uid()), Some(like.gid()))?;
        } else if file.metadata()?.gid() != like.gid()
            && std::os::unix::fs::fchown(&file, None, Some(like.gid())).is_err()
        {
            mode &= !0o070;
        }
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        // A default ACL of the directory, inherited, would let its named users read it.
        crate::sqlite::ffi::sys::remove_access_acl(&file)
    })();
    match made {
        Ok(()) => Ok(file),
        Err(error) => {
            let _ = std::fs::remove_file(path);
            Err(error)
        }
    }
}

/// The OS error when this process (`ulimit -n`) or the system has no file descriptor left,
/// found by opening one: SQLite reports that as "unable to open database file", like a
/// missing permission.
pub(crate) fn out_of_descriptors() -> Option<std::io::Error> {
    match File::open("/dev/null") {
        Err(error) if matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
            Some(error)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_at_once_and_a_regular_file_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let error = read_regular(&fifo, 100).unwrap_err();
        assert!(error.to_string().contains("a FIFO"), "{error}");
        let file = dir.path().join("file");
        std::fs::write(&file, "1234567890").unwrap();
        assert_eq!(read_regular(&file, 4).unwrap(), "1234");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(read_regular(&link, 4).is_err());
        assert_eq!(
            irregular(std::fs::metadata("/dev/null").unwrap().file_type()),
            Some("a character device")
        );
    }
}
