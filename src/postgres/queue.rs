//! The write queue on PostgreSQL, for writers that have met a conflict.
//!
//! A `SERIALIZABLE` transaction that waits for a row another one holds is doomed once that one
//! commits (its snapshot is older): waiting in the server does not help it, and writers of a
//! hot row retry until one happens to begin just after a commit, newcomers first as often as
//! not. So a write that has failed once takes its turn in a queue before it runs again: a
//! session advisory lock of the application's own, waited for in the server's lock queue (in
//! arrival order) in a short transaction of its own sent in the same round trip as the
//! write's `BEGIN`, kept across the write's attempts, and handed to the next waiter by the
//! write's `COMMIT` (in whose batch it becomes a transaction lock of the same key).
//!
//! A write that does not queue takes the turn in shared mode for its transaction: writers
//! that do not queue share it, so while no writer queues, writes keep all of the server's
//! concurrency; a writer that queues is given the turn once those under way are done, and
//! while one holds it or waits for it the shared request is refused at once and the write
//! queues instead. So no newcomer slips in between two turns (one that took the hot row there
//! doomed the next holder's attempt, and one that kept winning so never met a conflict and
//! never queued). A writer in a transaction never waits for the queue (the shared request
//! gives up after 1 ms), so the queue cannot close a cycle of lock waits.
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

/// The batch that waits at most `left` for the queue's turn `key` and then begins the write's
/// transaction with `begin`, in one round trip: the wait runs in a transaction of its own
/// (`SET LOCAL` bounds it; a `SELECT` takes a snapshot, which must not be the write's), whose
/// `COMMIT` keeps the session lock. A waiter woken by the holder's `COMMIT` (see
/// [`hand_over`]) begins at once, without waiting for its program to read the answer and ask
/// again. After a failure, see [`after_failed_take`].
pub(crate) fn take_then(key: (i32, i32), left: Duration, begin: &str) -> String {
    format!(
        "BEGIN; SET LOCAL lock_timeout = {}; SELECT pg_advisory_lock({}, {}); COMMIT; {begin}",
        millis(Some(left)),
        key.0,
        key.1,
    )
}

/// What a write that does not wait for the turn runs right after its `BEGIN`: the turn in
/// shared mode, for the transaction, refused at once (a lock timeout) while a writer holds
/// the turn or waits for it. Writers that do not wait for the turn share it; one that waits
/// for it is given it once they are done, and none starts meanwhile: a writer that never met
/// a conflict cannot slip in between the turns of writers that did (a newcomer that took the
/// row between two turns doomed the next turn's holder, and one that kept winning so kept
/// the queue at a third of its pace). Refused, the write waits for the turn
/// ([`busy_then`]).
pub(crate) fn probe(key: (i32, i32)) -> String {
    format!(
        "; SET LOCAL lock_timeout = 1; SELECT pg_advisory_xact_lock_shared({}, {})",
        key.0, key.1
    )
}

/// What a write whose [`probe`] was refused runs instead, in one round trip: the end of the
/// refused transaction, then [`take_then`].
pub(crate) fn busy_then(key: (i32, i32), left: Duration, begin: &str) -> String {
    format!("ROLLBACK; {}", take_then(key, left, begin))
}

/// After a [`take_then`] batch failed on a session that is not lost: ends the transaction it
/// failed in, and gives the turn back if it was taken (the wait timed out: it was not;
/// anything else may have failed after it was).
pub(crate) fn after_failed_take(conn: &mut PgConnection, key: (i32, i32), timed_out: bool) {
    let sql = if timed_out {
        "ROLLBACK".to_owned()
    } else {
        format!("ROLLBACK; {}", give_back_if_held(key))
    };
    if let Err(error) = conn.batch_execute(&sql) {
        tracing::warn!(error = %crate::escaped::Escaped::new(&error.to_string()), "cannot end a failed wait for the write queue's turn; closing the session");
        super::failure::discard(conn);
    }
}

/// What a write holding the turn runs in its `COMMIT`'s batch, before the `COMMIT`: the
/// session lock becomes a transaction lock of the same key (granted at once: the session holds
/// it), so that the `COMMIT` itself hands the turn to the next waiter, with no round trip of
/// its own after it. A `COMMIT` that fails ends the transaction and the turn with it.
pub(crate) fn hand_over(key: (i32, i32)) -> String {
    format!(
        "SELECT pg_advisory_xact_lock({0}, {1}); SELECT pg_advisory_unlock({0}, {1})",
        key.0, key.1
    )
}

/// Gives the turn back if this session still holds it at session level (after a
/// [`hand_over`] batch that failed, where it is not known which statement did), without the
/// server's warning for a lock not held.
fn give_back_if_held(key: (i32, i32)) -> String {
    // A two-key advisory lock is listed with its keys as oids (their bits) and objsubid 2.
    format!(
        "SELECT pg_advisory_unlock({0}, {1}) FROM pg_locks WHERE locktype = 'advisory' \
         AND pid = pg_backend_pid() AND granted AND mode = 'ExclusiveLock' AND classid = '{2}'::oid \
         AND objid = '{3}'::oid AND objsubid = 2",
        key.0, key.1, key.0 as u32, key.1 as u32
    )
}

/// [`give_back_if_held`], run now; a session that cannot is not handed out again.
pub(crate) fn give_back_if_still_held(conn: &mut PgConnection, key: (i32, i32)) {
    if let Err(error) = conn.batch_execute(&give_back_if_held(key)) {
        tracing::warn!(error = %crate::escaped::Escaped::new(&error.to_string()), "cannot give back the write queue's turn; closing the session");
        super::failure::discard(conn);
    }
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
