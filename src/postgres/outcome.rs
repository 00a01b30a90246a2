//! What became of a `COMMIT` whose session was lost while it was in flight, asked of the
//! server on a fresh session: PostgreSQL keeps the status of every recent transaction
//! (`pg_xact_status`), so a write whose commit answer never came is known to have committed
//! (and is answered as such), known not to have (and is run again), or, where the server
//! cannot prove it, reported as [`Error::CommitOutcomeUnknown`](crate::Error::CommitOutcomeUnknown).
//!
//! A transaction id is trusted to be the write's own only while the server has not
//! restarted, crashed or failed over since the write began: after a crash, an id whose
//! records never reached the disk is handed out again, and its status is a stranger's. So
//! "committed" counts only on the same timeline with no checkpoint since the write began
//! (every restart, crash recovery and promotion makes one or changes the timeline);
//! "aborted", and an id the server never handed out, mean not committed in every case (a
//! write that committed durably keeps its id); "in progress" is waited out.

use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Text};
use diesel::{sql_query, PgConnection, QueryResult, QueryableByName, RunQueryDsl};

use super::session::PgPool;

/// What a write transaction is known by, read in it just before its `COMMIT`.
#[derive(Clone, Debug, QueryableByName)]
pub(crate) struct Stamp {
    /// `pg_current_xact_id()`, with its epoch.
    #[diesel(sql_type = Text)]
    xid: String,
    /// When the transaction began, in whole seconds since the epoch, rounded down.
    #[diesel(sql_type = BigInt)]
    began: i64,
    /// The server's timeline then (the first 8 digits of its WAL file name).
    #[diesel(sql_type = Text)]
    timeline: String,
}

/// Reads the [`Stamp`] of the transaction open on `conn` (and gives it an id if it had none).
pub(crate) fn stamp(conn: &mut PgConnection) -> QueryResult<Stamp> {
    sql_query(
        "SELECT pg_current_xact_id()::text AS xid, \
           extract(epoch FROM date_trunc('second', now()))::bigint AS began, \
           substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) AS timeline",
    )
    .get_result(conn)
}

/// What became of the transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Committed,
    NotCommitted,
    Unknown,
}

#[derive(QueryableByName)]
struct Now {
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Text)]
    timeline: String,
    #[diesel(sql_type = BigInt)]
    checkpoint: i64,
}

/// Asks the server on a session of `pool` what became of the transaction `stamp`, until
/// `deadline`: a session lost meanwhile (the server restarting) is replaced, and a
/// transaction still in progress (its old session finishing) is waited for.
pub(crate) fn resolve(pool: &PgPool, stamp: &Stamp, deadline: Instant) -> Outcome {
    let mut pause = Duration::from_millis(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Outcome::Unknown;
        }
        let Ok(mut conn) = pool.get_timeout(left) else {
            return Outcome::Unknown;
        };
        match ask(&mut conn, stamp) {
            Ok(now) => {
                if let Some(outcome) = decide(stamp, &now) {
                    if outcome == Outcome::Unknown {
                        // Why, for the operator: a failover (a new timeline) or a restart or
                        // crash (a checkpoint since the write began).
                        tracing::warn!(
                            db.system.name = super::DB_SYSTEM,
                            status = %now.status,
                            timeline_then = %stamp.timeline,
                            timeline_now = %now.timeline,
                            checkpoint_since = now.checkpoint >= stamp.began,
                            "the session was lost during COMMIT; the server cannot prove \
                             whether the transaction committed"
                        );
                    }
                    return outcome;
                }
            }
            Err(error) => {
                // A dead session of the pool's: the next one may work; anything else says
                // nothing about the transaction.
                if super::failure::transient(&error) != Some(super::PgFailureKind::ConnectionLost) {
                    return Outcome::Unknown;
                }
            }
        }
        drop(conn);
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

fn ask(conn: &mut PgConnection, stamp: &Stamp) -> QueryResult<Now> {
    sql_query(
        "SELECT CASE WHEN $1::xid8 < pg_snapshot_xmax(pg_current_snapshot()) \
             THEN coalesce(pg_xact_status($1::xid8), 'forgotten') ELSE 'never assigned' END \
             AS status, \
           substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) AS timeline, \
           (SELECT extract(epoch FROM checkpoint_time)::bigint FROM pg_control_checkpoint()) \
             AS checkpoint",
    )
    .bind::<Text, _>(&stamp.xid)
    .get_result(conn)
}

/// The outcome the server's answer proves, or `None` while the transaction is in progress.
fn decide(stamp: &Stamp, now: &Now) -> Option<Outcome> {
    Some(match now.status.as_str() {
        "in progress" => return None,
        "aborted" | "never assigned" => Outcome::NotCommitted,
        "committed" if now.timeline == stamp.timeline && now.checkpoint < stamp.began => {
            Outcome::Committed
        }
        _ => Outcome::Unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_counts_only_without_a_checkpoint_or_new_timeline_since() {
        let stamp = Stamp {
            xid: "800".into(),
            began: 1000,
            timeline: "00000001".into(),
        };
        let now = |status: &str, timeline: &str, checkpoint| Now {
            status: status.into(),
            timeline: timeline.into(),
            checkpoint,
        };
        assert_eq!(
            decide(&stamp, &now("committed", "00000001", 999)),
            Some(Outcome::Committed)
        );
        // A checkpoint in the second the write began, or later: maybe a crash's.
        assert_eq!(
            decide(&stamp, &now("committed", "00000001", 1000)),
            Some(Outcome::Unknown)
        );
        // A promoted standby.
        assert_eq!(
            decide(&stamp, &now("committed", "00000002", 999)),
            Some(Outcome::Unknown)
        );
        for status in ["aborted", "never assigned"] {
            assert_eq!(
                decide(&stamp, &now(status, "00000002", 2000)),
                Some(Outcome::NotCommitted)
            );
        }
        assert_eq!(decide(&stamp, &now("in progress", "00000001", 0)), None);
        assert_eq!(
            decide(&stamp, &now("forgotten", "00000001", 0)),
            Some(Outcome::Unknown)
        );
    }
}
