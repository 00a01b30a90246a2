//! The journal mode: read it without a lock, decide, and switch once, at open.
//!
//! Switching needs a write lock and fails at once, without the busy handler, while another
//! connection writes or switches, so the switch runs under the write turn and the retry
//! policy (see [`Opening::journal_mode`](super::Opening)). SQLite answers the switch with the
//! mode it really put in force (a VFS without shared memory keeps the old one, without an
//! error), so the answer is checked.

use diesel::sql_types::Text;
use diesel::{sql_query, QueryResult, QueryableByName, RunQueryDsl, SqliteConnection};

use crate::pragma::JournalMode;

#[derive(QueryableByName)]
struct ModeRow {
    #[diesel(sql_type = Text)]
    journal_mode: String,
}

/// `PRAGMA journal_mode`, without assignment: reads the mode, takes no write lock. SQLite's
/// answer, lowercase.
pub(crate) fn read(conn: &mut SqliteConnection) -> QueryResult<String> {
    sql_query("PRAGMA journal_mode")
        .get_result::<ModeRow>(conn)
        .map(|row| row.journal_mode.to_ascii_lowercase())
}

/// `PRAGMA journal_mode = <wanted>`; SQLite's answer (the mode now in force), lowercase.
pub(crate) fn switch(conn: &mut SqliteConnection, wanted: JournalMode) -> QueryResult<String> {
    // The layer's own: the authorizer denies the assignment to users (see `guard`).
    crate::sqlite::guard::own(|| {
        sql_query(format!("PRAGMA journal_mode = {}", wanted.as_str())).get_result::<ModeRow>(conn)
    })
    .map(|row| row.journal_mode.to_ascii_lowercase())
}

/// What to do with the mode a file is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Nothing: it is in force (or the database is in memory, which cannot be WAL).
    Keep(JournalMode),
    /// Switch to the wanted mode.
    Switch,
    /// Refuse: the file is in WAL and a rollback mode is wanted, which needs every other
    /// connection closed, so it is never done at run time.
    Refuse,
}

/// What to do with a file in mode `found` when `wanted` is asked for.
pub(crate) fn decide(found: JournalMode, wanted: JournalMode) -> Decision {
    match found {
        JournalMode::Memory => Decision::Keep(JournalMode::Memory),
        mode if mode == wanted => Decision::Keep(mode),
        JournalMode::Wal => Decision::Refuse,
        _ => Decision::Switch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JournalMode::*;

    #[test]
    fn switches_only_when_needed_and_never_leaves_wal() {
        assert_eq!(decide(Wal, Wal), Decision::Keep(Wal));
        assert_eq!(decide(Delete, Wal), Decision::Switch);
        assert_eq!(decide(Off, Wal), Decision::Switch);
        assert_eq!(decide(Memory, Wal), Decision::Keep(Memory));
        assert_eq!(decide(Memory, Delete), Decision::Keep(Memory));
        assert_eq!(decide(Delete, Delete), Decision::Keep(Delete));
        assert_eq!(decide(Truncate, Delete), Decision::Switch);
        assert_eq!(decide(Wal, Delete), Decision::Refuse);
    }
}
