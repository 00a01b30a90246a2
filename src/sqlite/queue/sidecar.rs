//! The write queue's file, `<database>-lock`: the only code that opens it. Its holders
//! `flock` it (see `queue`); at its start the turn's holder records who it is and what it
//! does ([`Record`], 20 bytes), at byte 24 a connection of this crate that completed a
//! checkpoint records when (12 bytes), and from byte 4096 its waiters take their seats (the
//! waiting board, `board`, one page).
//!
//! Every open is by a path that is never followed if it is a symbolic link, never blocks
//! (a FIFO put there would block an open until a writer came: the open of a database whose
//! `-lock` was a FIFO hung for ever), and keeps a file only if it is a regular one.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::{Error, FileOperation, Result};
use crate::operation::Operation;
use crate::sqlite::files::{made_by_a_writer, open_regular, open_regular_for};
use crate::sqlite::side::side_file;

/// One database's `-lock` file.
#[derive(Debug, Clone)]
pub(crate) struct Sidecar {
    pub(crate) path: Arc<Path>,
}

impl Sidecar {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path: path.into() }
    }

    /// Creates the sidecar if it does not exist, with its mode and owner set on its
    /// descriptor (see `WriteQueue::new`).
    pub(crate) fn create(&self, database: &Path) -> Result<()> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(database).ok();
        let mode = meta.as_ref().map_or(0o600, |m| sidecar_mode(m.mode()));
        let owner = meta.map(|m| (m.uid(), m.gid()));
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)
        {
            Ok(file) => file,
            // Another process made it first, or it is a symbolic link: `open` tells which.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(source) => return Err(self.io_error(FileOperation::CreateQueue)(source)),
        };
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(self.io_error(FileOperation::SetPermissions))?;
        if let (true, Some((uid, gid))) = (crate::sqlite::ffi::sys::is_root(), owner) {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                .map_err(self.io_error(FileOperation::SetPermissions))?;
        }
        Ok(())
    }

    pub(crate) fn io_error(
        &self,
        operation: FileOperation,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = self.path.to_path_buf();
        move |source| Error::Io {
            operation,
            path,
            source,
        }
    }

    /// A description of its own to lock: flock locks belong to the description, so threads
    /// of one process queue against each other as processes do. Read-only: flock needs no
    /// write access.
    pub(crate) fn open(&self) -> Result<File> {
        open_regular(&self.path, false).map_err(self.io_error(FileOperation::OpenQueue))
    }

    /// The sidecar open, if it is the database's (see `files::made_by_a_writer`): another
    /// user's `-lock` in a sticky directory, held by them, stopped every writer for the
    /// whole retry deadline. Checked once, when a handle takes the queue: a file of this
    /// user's, or the database owner's, cannot be replaced by a stranger afterwards.
    pub(crate) fn open_checked(&self, database: &Path) -> Result<File> {
        let file = self.open()?;
        let database = std::fs::metadata(database).ok();
        match file.metadata() {
            Ok(meta) if made_by_a_writer(&meta, database.as_ref()) => Ok(file),
            Ok(_) => Err(self.io_error(FileOperation::OpenQueue)(
                std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "it belongs to a user who may not write the database, or anyone may write it",
                ),
            )),
            Err(source) => Err(self.io_error(FileOperation::OpenQueue)(source)),
        }
    }

    /// The sidecar open for writing its holder record (and, where this process may also
    /// read it, for mapping its waiting board), if this process may.
    pub(crate) fn open_for_records(&self) -> Option<File> {
        open_regular_for(&self.path, true, true)
            .or_else(|_| open_regular(&self.path, true))
            .ok()
    }
}

/// The sidecar's permission bits for a database file of mode `mode`: the database's, with
/// read permission only for the classes that may also write it.
fn sidecar_mode(mode: u32) -> u32 {
    let writable = mode & 0o222;
    (mode & 0o666 & !0o444) | (mode & 0o444 & (writable << 1))
}

/// What the write queue's holder writes at the start of the queue's file when it takes its
/// turn: `SPQ1`, its pid, its operation's code, and the time (milliseconds since the Unix
/// epoch), little-endian. Only a holder of the turn writes it, so a record whose pid the OS
/// lock table names as the holder is that holder's (or its process's previous turn's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub pid: u32,
    pub operation: Operation,
    pub since: SystemTime,
}

const RECORD_MAGIC: &[u8; 4] = b"SPQ1";
const RECORD_LEN: usize = 20;

impl Record {
    /// This process's record for `operation`, now.
    pub(crate) fn now(operation: Operation) -> Self {
        Self {
            pid: std::process::id(),
            operation,
            since: SystemTime::now(),
        }
    }

    fn encode(&self) -> [u8; RECORD_LEN] {
        let millis = self
            .since
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut bytes = [0u8; RECORD_LEN];
        bytes[..4].copy_from_slice(RECORD_MAGIC);
        bytes[4..8].copy_from_slice(&self.pid.to_le_bytes());
        bytes[8] = self.operation.code();
        bytes[12..20].copy_from_slice(&millis.to_le_bytes());
        bytes
    }

    /// The record in `bytes`, if they hold one that makes sense (anyone who may write the
    /// database may write the file: a time in the future is refused).
    fn decode(bytes: &[u8; RECORD_LEN]) -> Option<Self> {
        if &bytes[..4] != RECORD_MAGIC {
            return None;
        }
        let pid = u32::from_le_bytes(bytes[4..8].try_into().ok()?);
        let operation = Operation::from_code(bytes[8])?;
        let millis = u64::from_le_bytes(bytes[12..20].try_into().ok()?);
        let since = SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(millis))?;
        (since <= SystemTime::now() + Duration::from_secs(1)).then_some(Self {
            pid,
            operation,
            since,
        })
    }

    /// Writes it at the start of the queue's `file` (open for writing). Best effort: a
    /// holder whose record cannot be written is still named by pid.
    pub(crate) fn write_to(&self, file: &File) {
        let _ = file.write_at(&self.encode(), 0);
    }
}

/// Where, after the holder record, a connection of this crate that completed a checkpoint
/// records when (`SPC1` and milliseconds since the Unix epoch, little-endian).
const CHECKPOINT_AT: u64 = 24;
const CHECKPOINT_MAGIC: &[u8; 4] = b"SPC1";

/// Records in the queue's file of `database` that a checkpoint completed now. Best effort,
/// and only into a file that exists: the file's flock descriptions are others', so closing
/// this one takes no lock away.
pub(crate) fn record_checkpoint(database: &Path) {
    let Ok(file) = open_regular(&side_file(database, "-lock"), true) else {
        return;
    };
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(CHECKPOINT_MAGIC);
    bytes[4..].copy_from_slice(&millis.to_le_bytes());
    let _ = file.write_at(&bytes, CHECKPOINT_AT);
}

/// When a connection of this crate last completed a checkpoint of `database`, as recorded in
/// its queue's file.
pub(crate) fn last_checkpoint_of(database: &Path) -> Option<SystemTime> {
    let file = open_regular(&side_file(database, "-lock"), false).ok()?;
    let mut bytes = [0u8; 12];
    file.read_exact_at(&mut bytes, CHECKPOINT_AT).ok()?;
    if &bytes[..4] != CHECKPOINT_MAGIC {
        return None;
    }
    let millis = u64::from_le_bytes(bytes[4..].try_into().ok()?);
    let at = SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(millis))?;
    (at <= SystemTime::now() + Duration::from_secs(1)).then_some(at)
}

/// The holder record in the queue's file of `database`, if it can be read and holds one.
pub(crate) fn read_record(database: &Path) -> Option<Record> {
    let file = open_regular(&side_file(database, "-lock"), false).ok()?;
    let mut bytes = [0u8; RECORD_LEN];
    file.read_exact_at(&mut bytes, 0).ok()?;
    Record::decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_those_who_may_write_the_database_may_read_the_sidecar() {
        assert_eq!(sidecar_mode(0o600), 0o600);
        assert_eq!(sidecar_mode(0o644), 0o600);
        assert_eq!(sidecar_mode(0o640), 0o600);
        assert_eq!(sidecar_mode(0o660), 0o660);
        assert_eq!(sidecar_mode(0o664), 0o660);
        assert_eq!(sidecar_mode(0o666), 0o666);
        assert_eq!(sidecar_mode(0o100644), 0o600);
        assert_eq!(sidecar_mode(0o444), 0o000);
    }

    #[test]
    fn a_record_reads_back_and_nonsense_is_refused() {
        let record = Record::now(Operation::Migrate);
        let bytes = record.encode();
        let back = Record::decode(&bytes).unwrap();
        assert_eq!(back.pid, record.pid);
        assert_eq!(back.operation, Operation::Migrate);
        let drift = record.since.duration_since(back.since).unwrap();
        assert!(drift < Duration::from_millis(1));
        let mut bad = bytes;
        bad[0] = b'X';
        assert_eq!(Record::decode(&bad), None);
        let mut bad = bytes;
        bad[8] = 250;
        assert_eq!(Record::decode(&bad), None);
        // A time far in the future, as a hostile writer of the file might put.
        let mut bad = bytes;
        bad[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(Record::decode(&bad), None);
    }
}
