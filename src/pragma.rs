//! Typed pragma values, rendered in one place (`as_str`).

use std::fmt;

/// How SQLite keeps its journal (`PRAGMA journal_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JournalMode {
    /// Write-ahead log: readers never block the writer nor the writer them. The default.
    Wal,
    /// Rollback journal, deleted after each transaction (SQLite's own default). For
    /// filesystems where WAL's shared memory does not work.
    Delete,
    /// Rollback journal, truncated instead of deleted.
    Truncate,
    /// Rollback journal, header zeroed instead of deleted.
    Persist,
    /// In memory; what an in-memory database always reports. Not a mode to ask for.
    Memory,
    /// No journal: a crash mid-transaction corrupts the file. Only ever reported, for a file
    /// that another program put in this mode; not a mode to ask for.
    Off,
}

impl JournalMode {
    /// The keyword SQLite uses for this mode.
    pub const fn as_str(self) -> &'static str {
        match self {
            JournalMode::Wal => "wal",
            JournalMode::Delete => "delete",
            JournalMode::Truncate => "truncate",
            JournalMode::Persist => "persist",
            JournalMode::Memory => "memory",
            JournalMode::Off => "off",
        }
    }

    /// Parses what `PRAGMA journal_mode` returns (case-insensitive); `None` for a word that
    /// is none of SQLite's modes.
    pub fn parse(mode: &str) -> Option<Self> {
        [
            JournalMode::Wal,
            JournalMode::Delete,
            JournalMode::Truncate,
            JournalMode::Persist,
            JournalMode::Memory,
            JournalMode::Off,
        ]
        .into_iter()
        .find(|m| m.as_str().eq_ignore_ascii_case(mode))
    }
}

impl fmt::Display for JournalMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How often SQLite waits for the disk (`PRAGMA synchronous`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Synchronous {
    /// Never waits: a power loss can corrupt the file.
    Off,
    /// Under WAL, never corrupt, but not durable: commits are not synced one by one, so a
    /// power loss or an OS crash can take back the last acknowledged commits (a crash of the
    /// process alone cannot). The default under WAL: the usual choice where a lost last
    /// second is acceptable.
    Normal,
    /// Waits for the disk at every commit: under WAL (and the TRUNCATE and PERSIST journals)
    /// an acknowledged commit survives a power loss. The default with TRUNCATE and PERSIST;
    /// choose it under WAL where every acknowledged write must survive
    /// (`Options::synchronous(Synchronous::Full)`), at the cost of an fsync per commit. With
    /// the DELETE journal it does not sync the directory after deleting the journal: a power
    /// loss can take back the last acknowledged transaction (use `Extra`).
    Full,
    /// As `Full`, and also syncs the directory after deleting a rollback journal: the default
    /// with the DELETE journal, where it is what makes an acknowledged commit survive a power
    /// loss.
    Extra,
}

impl Synchronous {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        }
    }
}

/// Where SQLite keeps temporary tables and indices (`PRAGMA temp_store`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TempStore {
    /// As compiled in (a file, for the bundled SQLite).
    Default,
    /// In temporary files.
    File,
    /// In memory: faster sorts and `GROUP BY`, no temporary files.
    Memory,
}

impl TempStore {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            TempStore::Default => "DEFAULT",
            TempStore::File => "FILE",
            TempStore::Memory => "MEMORY",
        }
    }
}
