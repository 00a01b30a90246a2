//! The write queue on PostgreSQL, for writers that have met a conflict.
//!
//! A `SERIALIZABLE` transaction that waits for a row another one holds is doomed once that one
//! commits (its snapshot is older): waiting in the server does not help it, and writers of a
//! hot row retry until one happens to begin just after a commit, newcomers first as often as
//! not. So a write that has failed once takes its turn in a queue before it runs again: a
//! session advisory lock of the application's own, waited for in the server's lock queue (in
//! arrival order) in autocommit, before `BEGIN`, and held until the write is done. First
//! attempts never queue, so writes that do not conflict keep all of the server's concurrency;
//! a writer in a transaction never waits for the queue, so the queue cannot close a cycle of
//! lock waits.
//!
//! Behind a transaction pooler ([`Options::transaction_pooling`](crate::Options::transaction_pooling))
//! a session lock does not hold: the turn would be taken on one server connection and given
//! back on another (or never), left held for whoever comes next. There the turn is taken
//! inside each attempt's transaction, right after its `BEGIN` and before its first query,
//! with `LOCK TABLE` on the layer's checksum table in `SHARE UPDATE EXCLUSIVE` mode, and
//! released by its `COMMIT` or `ROLLBACK`: that mode conflicts with itself and with no read
//! or write of the table (only with `VACUUM`, `ANALYZE` and DDL on it), and `LOCK` takes no
//! snapshot, so the `SERIALIZABLE` snapshot is taken after the wait and sees the commits
//! waited for. (`pg_advisory_xact_lock` cannot serve: it is a `SELECT`, which takes the
//! snapshot before it waits, and a snapshot older than the commits waited for dooms the
//! transaction.) The transaction holds nothing else while it waits, as before `BEGIN`. An
//! attempt that fails queues again for the next; a role that may not lock the table (it
//! needs `UPDATE`, `DELETE` or `TRUNCATE` on it), or a database without it, does without
//! the queue.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::{PgConnection, QueryResult};

use super::session::millis;
use crate::migrate::checksums::TABLE as CHECKSUMS;

/// The turn behind a transaction pooler, appended to the `BEGIN` batch of an attempt.
pub(crate) fn turn_in_transaction() -> String {
    format!("; LOCK TABLE {CHECKSUMS} IN SHARE UPDATE EXCLUSIVE MODE")
}

#[derive(diesel::QueryableByName)]
struct Flag {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    flag: bool,
}

/// Whether this session's role can take [`turn_in_transaction`]: the table exists, and the
/// role may lock it in that mode.
pub(crate) fn turn_in_transaction_usable(conn: &mut PgConnection) -> QueryResult<bool> {
    use diesel::RunQueryDsl;
    Ok(diesel::sql_query(
        "SELECT coalesce(has_table_privilege(to_regclass($1), 'UPDATE, DELETE, TRUNCATE'), \
         false) AS flag",
    )
    .bind::<diesel::sql_types::Text, _>(CHECKSUMS)
    .get_result::<Flag>(conn)?
    .flag)
}

/// Waits at most `left` for the queue's turn `key` on `conn`'s session; `lock_timeout` is the
/// session's own setting, restored afterwards.
pub(crate) fn take(
    conn: &mut PgConnection,
    key: (i32, i32),
    left: Duration,
    lock_timeout: Duration,
) -> QueryResult<()> {
    // One round trip; a wait that times out rolls the batch back, its first SET included.
    conn.batch_execute(&format!(
        "SET lock_timeout = {}; SELECT pg_advisory_lock({}, {}); SET lock_timeout = {}",
        millis(Some(left)),
        key.0,
        key.1,
        millis(Some(lock_timeout)),
    ))
}

/// Gives the turn back. A session that cannot is not handed out again (the server releases
/// the lock when it closes).
pub(crate) fn give_back(conn: &mut PgConnection, key: (i32, i32)) {
    if let Err(error) =
        conn.batch_execute(&format!("SELECT pg_advisory_unlock({}, {})", key.0, key.1))
    {
        tracing::warn!(error = %crate::escaped::Escaped::new(&error.to_string()), "cannot give back the write queue's turn; closing the session");
        super::failure::discard(conn);
    }
}

/// A wait for the queue's turn longer than this means other writers were queued.
pub(crate) const CONTENDED_WAIT: Duration = Duration::from_millis(1);

/// How long after a conflict this handle's writes queue from their first attempt.
const CONTENDED_FOR: Duration = Duration::from_secs(1);

/// When the writes of one handle last met a conflict.
#[derive(Debug, Default)]
pub(crate) struct Conflicts {
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Conflicts {
    /// A write met a conflict now.
    pub(crate) fn met(&self) {
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(std::time::Instant::now());
    }

    /// Whether one did within [`CONTENDED_FOR`].
    pub(crate) fn recent(&self) -> bool {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < CONTENDED_FOR)
    }
}
