//! Who holds a database's write lock, from the operating system's lock table: the answer an
//! error gives when a write waited its whole deadline.
//!
//! Every process that writes holds OS locks the kernel lists in `/proc/locks` (Linux): the
//! write queue's `flock` on `<database>-lock`, and SQLite's own write lock, a POSIX lock on
//! byte 120 of `-shm` under WAL or on the database file's RESERVED byte in rollback-journal
//! mode. So a holder is named by pid whether it uses this crate or not (the sqlite3 shell,
//! another library). Elsewhere than Linux the list is empty.

use std::fmt;
use std::time::SystemTime;

use crate::operation::Operation;

/// A process that held a lock a write waited for.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Holder {
    /// Its process id.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`), if it could be read.
    pub command: Option<String>,
    /// The lock it held.
    pub lock: HeldLock,
    /// For the write queue's holder: what it was doing, as it recorded in the queue's file.
    pub operation: Option<Operation>,
    /// For the write queue's holder: when it took the turn, as it recorded (a process
    /// records at most every 100 ms for one operation, so up to that much early).
    pub since: Option<SystemTime>,
    /// PostgreSQL: the server hides this session's activity from the role that asked (a
    /// session of another role, to a role without `pg_read_all_stats`): its pid and name
    /// are known, not how long it has been in its transaction.
    pub hidden: bool,
}

/// Which lock a [`Holder`] held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HeldLock {
    /// The write queue's turn (`<database>-lock`): a writer of this crate.
    WriteQueue,
    /// SQLite's write lock: any writer, of this crate or not.
    WriteLock,
    /// A read transaction that reads from the WAL: until it ends, no checkpoint can pass the
    /// frames it may read, so `-wal` cannot be reset.
    WalReader,
    /// A read transaction begun when the WAL had nothing to add (empty, or all checkpointed):
    /// it reads the database file alone, so until it ends no checkpoint can copy anything
    /// into the file.
    FileReader,
    /// PostgreSQL: the advisory lock of the migration batch (its `pid` is the server
    /// process of the session, its `command` the session's `application_name`).
    MigrationLock,
    /// PostgreSQL: the write queue's turn (a session advisory lock that writers which met a
    /// conflict take before they run again; see [`Options::fair_queue`](crate::Options::fair_queue)).
    ServerWriteQueue,
    /// PostgreSQL: a session whose write transaction was open before the wait began, and
    /// still was when it gave up: what a row or table lock wait most likely waited for.
    ServerTransaction,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.lock {
            HeldLock::MigrationLock | HeldLock::ServerWriteQueue | HeldLock::ServerTransaction => {
                write!(f, "server process {}", self.pid)?
            }
            _ => write!(f, "process {}", self.pid)?,
        }
        if let Some(command) = self.command.as_ref().filter(|c| !c.is_empty()) {
            write!(f, " ({})", crate::escaped::Escaped::new(command))?;
        }
        f.write_str(match self.lock {
            HeldLock::WriteQueue => " holding the write queue",
            HeldLock::WriteLock => " holding the write lock",
            HeldLock::WalReader => " reading from the WAL",
            HeldLock::FileReader => " reading the database file",
            HeldLock::MigrationLock => " holding the migration lock",
            HeldLock::ServerWriteQueue => " holding the write queue",
            HeldLock::ServerTransaction => " in a write transaction",
        })?;
        if let Some(held) = self.since.and_then(|since| since.elapsed().ok()) {
            write!(f, " for {:.1} s", held.as_secs_f64())?;
        }
        if let Some(operation) = self.operation {
            write!(f, " ({operation})")?;
        }
        if self.hidden {
            f.write_str(" (another role's session, whose activity this role cannot see)")?;
        }
        Ok(())
    }
}
