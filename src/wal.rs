//! The journal-mode switch: once, at open, on a dedicated connection, retried and verified.

use std::path::Path;

use diesel::sql_types::Text;
use diesel::{sql_query, QueryResult, QueryableByName, RunQueryDsl, SqliteConnection};

use crate::error::{Error, Result};
use crate::fair::{wait_turn, WriteQueue};
use crate::options::{JournalMode, Options};
use crate::retry::{retry_locked, Clock};

#[derive(QueryableByName)]
struct ModeRow {
    #[diesel(sql_type = Text)]
    journal_mode: String,
}

/// `PRAGMA journal_mode`, without assignment: reads the mode, takes no write lock.
pub(crate) fn read_journal_mode(conn: &mut SqliteConnection) -> QueryResult<String> {
    sql_query("PRAGMA journal_mode")
        .get_result::<ModeRow>(conn)
        .map(|row| row.journal_mode.to_ascii_lowercase())
}

/// Puts the file in `options`' journal mode and returns the mode in force.
///
/// Reads first and switches only when needed: the switch needs a write lock and fails at
/// once, without the busy handler, while another connection writes or switches, so it runs
/// under the retry policy. SQLite answers the switch with the mode it really put in force
/// (a VFS without shared memory keeps the old one, without an error), so the answer is
/// checked. In-memory databases report `memory` and cannot be WAL: that is accepted.
pub(crate) fn ensure_journal_mode(
    conn: &mut SqliteConnection,
    path: &Path,
    options: &Options,
    queue: Option<&WriteQueue>,
    clock: &dyn Clock,
) -> Result<JournalMode> {
    let wanted = options.journal_mode;
    let mismatch = |actual: &str, hint| Error::JournalMode {
        path: path.to_owned(),
        expected: wanted.to_string(),
        actual: actual.to_owned(),
        hint,
    };
    let current = retry_locked(&options.retry, clock, "read journal mode", |_| {
        read_journal_mode(conn).map_err(Error::from)
    })?
    .value;
    match JournalMode::parse(&current) {
        Some(JournalMode::Memory) => return Ok(JournalMode::Memory),
        Some(mode) if mode == wanted => return Ok(mode),
        Some(JournalMode::Wal) => {
            return Err(mismatch(
                &current,
                "leaving WAL needs every other connection closed, so it is never done at run \
                 time; switch the file offline (sqlite3 FILE 'PRAGMA journal_mode = DELETE')",
            ))
        }
        _ => {}
    }
    let (_turn, policy) = wait_turn(queue, "switch journal mode", &options.retry)?;
    let switched = retry_locked(&policy, clock, "switch journal mode", |_| {
        sql_query(format!("PRAGMA journal_mode = {}", wanted.as_str()))
            .get_result::<ModeRow>(conn)
            .map(|row| row.journal_mode.to_ascii_lowercase())
            .map_err(|source| Error::query("switch journal mode", source))
    })?
    .value;
    match JournalMode::parse(&switched) {
        Some(mode) if mode == wanted => {
            tracing::info!(path = %path.display(), journal_mode = %mode, "journal mode switched");
            Ok(mode)
        }
        _ => Err(mismatch(
            &switched,
            "SQLite kept the old mode: WAL needs shared memory, which this VFS or filesystem \
             does not offer; use a local filesystem, or ask for a rollback journal mode",
        )),
    }
}
