//! What the layer was doing: the steps that run statements, and the file-system calls.

use std::fmt;

/// A step of the layer that runs statements: what [`Error::Query`](crate::Error::Query), [`Error::Busy`](crate::Error::Busy) and
/// [`Error::Storage`](crate::Error::Storage) name, and the `operation` field of every `tracing` event of a retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// The per-connection pragmas (`busy_timeout` first).
    ApplyPragmas,
    /// Reading what the file records: applied migrations, their checksums, its application id.
    ReadMigrationState,
    /// `PRAGMA journal_mode`, read without switching.
    ReadJournalMode,
    /// `PRAGMA journal_mode = ...`: the once-only switch at open.
    SwitchJournalMode,
    /// The migration batch.
    Migrate,
    /// Writing `PRAGMA application_id` into a file that has none.
    StampApplicationId,
    /// Creating the checksum table.
    CreateChecksumTable,
    /// Recording a migration's checksum.
    RecordChecksum,
    /// [`Database::write`](crate::Database::write).
    Write,
    /// [`Database::read`](crate::Database::read).
    Read,
    /// [`Status::read`](crate::Status::read).
    ReadStatus,
    /// A statement of a `write` or `read` closure, converted with `?` from Diesel's error.
    Query,
    /// [`Database::connection`](crate::Database::connection).
    Connection,
    /// [`Database::backup_to`](crate::Database::backup_to).
    Backup,
    /// A PostgreSQL session's settings (timeouts, message language).
    ConfigureSession,
    /// Taking PostgreSQL's advisory lock for the migration batch.
    MigrationLock,
    /// Opening a session on a PostgreSQL server.
    Connect,
}

impl Operation {
    /// How messages and `tracing` events name it, such as `switch journal mode`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::ApplyPragmas => "apply connection pragmas",
            Operation::ReadMigrationState => "read migration state",
            Operation::ReadJournalMode => "read journal mode",
            Operation::SwitchJournalMode => "switch journal mode",
            Operation::Migrate => "migrate",
            Operation::StampApplicationId => "stamp the application id",
            Operation::CreateChecksumTable => "create the checksum table",
            Operation::RecordChecksum => "record a migration checksum",
            Operation::Write => "write",
            Operation::Read => "read",
            Operation::ReadStatus => "read status",
            Operation::Query => "query",
            Operation::Connection => "connection",
            Operation::Backup => "backup",
            Operation::ConfigureSession => "configure the session",
            Operation::MigrationLock => "take the migration lock",
            Operation::Connect => "connect",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A file-system call on a database's files: what [`Error::Io`](crate::Error::Io) names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FileOperation {
    /// Making the path absolute.
    ResolvePath,
    /// `stat`.
    ReadMetadata,
    /// `statfs`, to tell a network filesystem.
    FindFilesystem,
    /// Creating a new database file with [`Options::create_mode`](crate::Options::create_mode).
    Create,
    /// `chmod` of a file this process created.
    SetPermissions,
    /// Creating the write queue's `-lock` sidecar (never through a symbolic link).
    CreateQueue,
    /// Opening the write queue's sidecar.
    OpenQueue,
    /// `flock` of the write queue's sidecar.
    LockQueue,
    /// Syncing a backup, or linking it into place.
    WriteBackup,
    /// Opening the database (SQLite's open, which found no file descriptor left).
    OpenDatabase,
}

impl FileOperation {
    /// How messages name it, such as `read metadata of`.
    pub const fn as_str(self) -> &'static str {
        match self {
            FileOperation::ResolvePath => "resolve the path of",
            FileOperation::ReadMetadata => "read metadata of",
            FileOperation::FindFilesystem => "find the filesystem of",
            FileOperation::Create => "create",
            FileOperation::SetPermissions => "set the permissions of",
            FileOperation::CreateQueue => "create the write queue file",
            FileOperation::OpenQueue => "open the write queue file",
            FileOperation::LockQueue => "lock the write queue file",
            FileOperation::WriteBackup => "write the backup",
            FileOperation::OpenDatabase => "open",
        }
    }
}

impl fmt::Display for FileOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Operation {
    /// Every operation, in a fixed order: the write queue's holder record stores the index.
    const ALL: [Operation; 14] = [
        Operation::ApplyPragmas,
        Operation::ReadMigrationState,
        Operation::ReadJournalMode,
        Operation::SwitchJournalMode,
        Operation::Migrate,
        Operation::StampApplicationId,
        Operation::CreateChecksumTable,
        Operation::RecordChecksum,
        Operation::Write,
        Operation::Read,
        Operation::ReadStatus,
        Operation::Query,
        Operation::Connection,
        Operation::Backup,
    ];

    /// Its index in [`Operation::ALL`], as a byte.
    pub(crate) fn code(self) -> u8 {
        Self::ALL
            .iter()
            .position(|o| *o == self)
            .expect("every operation is listed") as u8
    }

    /// The operation of a [`code`](Operation::code), if it is one.
    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }
}

/// OpenTelemetry's `db.system.name` for SQLite: with `db.namespace` (the database file),
/// `db.operation.name` and `error.type`, an operator's subscriber can turn the layer's events
/// into metrics without knowing its own field names (`operation`, `attempt`, `delay_ms`,
/// `elapsed_ms`, `error`, which stay).
pub(crate) const DB_SYSTEM: &str = "sqlite";

/// `error.type` of a wait for a lock.
pub(crate) const ERROR_TYPE_BUSY: &str = "busy";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_has_a_code_that_reads_back() {
        for (i, operation) in Operation::ALL.iter().enumerate() {
            assert_eq!(operation.code() as usize, i);
            assert_eq!(Operation::from_code(operation.code()), Some(*operation));
        }
        assert_eq!(Operation::from_code(200), None);
    }
}
