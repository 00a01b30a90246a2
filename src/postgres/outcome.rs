//! What became of a `COMMIT` whose session was lost while it was in flight, asked of the
//! server on a fresh session: PostgreSQL keeps the status of every recent transaction
//! (`pg_xact_status`), so a write whose commit answer never came is known to have committed
//! (and is answered as such), known not to have (and is run again), or, where the server
//! cannot prove it, reported as [`Error::CommitOutcomeUnknown`](crate::Error::CommitOutcomeUnknown).
//!
//! A transaction id means the write's own transaction only on the server that handed it
//! out, and only while no crash made it hand the id out again (an id whose records never
//! reached the disk is). So an answer counts only from the same cluster (its system
//! identifier) on the same timeline, which every session records when it opens (a standby
//! promoted, a logical replica or another cluster behind the URL is not asked at all); and:
//! - "committed" counts only from the same server process tree (its start time) with no
//!   checkpoint since the write began, by time and by WAL position (every restart, crash
//!   recovery and promotion makes one);
//! - "aborted", and an id the server never handed out, mean not committed from the same
//!   server, or one that started after the write began (a write that committed durably
//!   keeps its id); so does "committed" from one that started after the write began when
//!   the id is past every id its latest checkpoint counts (the id was handed out again);
//! - "in progress" is waited out.
//!
//! A session whose role may not call the functions this needs (`pg_control_system`,
//! `pg_walfile_name`, ...) records no identity: its lost commits are unknown.

use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Text};
use diesel::{sql_query, PgConnection, QueryResult, QueryableByName, RunQueryDsl};

use super::session::PgPool;

/// Which server a session runs on: read once when it opens.
#[derive(Clone, Debug, PartialEq, Eq, QueryableByName)]
pub(crate) struct Identity {
    /// `pg_control_system().system_identifier`: the cluster (a physical standby shares it).
    #[diesel(sql_type = Text)]
    system: String,
    /// `pg_postmaster_start_time()`, seconds since the epoch: the server process tree.
    #[diesel(sql_type = Text)]
    started: String,
}

/// The [`Identity`] of `conn`'s server, or `None` if this role may not call what it and the
/// lookup need.
pub(crate) fn identify(conn: &mut PgConnection) -> Option<Identity> {
    identify_setting(conn, "")
}

/// [`identify`], with `columns` (more columns of the same `SELECT`, such as
/// `set_config` calls) run in the same round trip: `None`, and none of them run, if this role
/// may not call what the lookup needs.
pub(crate) fn identify_setting(conn: &mut PgConnection, columns: &str) -> Option<Identity> {
    sql_query(format!("{IDENTIFY}{columns}"))
        .get_result::<Identity>(conn)
        .ok()
}

const IDENTIFY: &str =
    "SELECT (SELECT system_identifier::text FROM pg_control_system()) AS system, \
           extract(epoch FROM pg_postmaster_start_time())::text AS started, \
           pg_walfile_name(pg_current_wal_insert_lsn()) IS NOT NULL \
             AND pg_xact_status(NULL::xid8) IS NULL \
             AND (SELECT checkpoint_time IS NOT NULL FROM pg_control_checkpoint()) AS usable";

/// What a write transaction is known by, read in it just before its `COMMIT`, with the
/// identity of its session's server.
#[derive(Clone, Debug)]
pub(crate) struct Stamp {
    read: Read,
    server: Identity,
}

#[derive(Clone, Debug, QueryableByName)]
struct Read {
    /// `pg_current_xact_id()`, with its epoch.
    #[diesel(sql_type = Text)]
    xid: String,
    /// When the transaction began, in seconds since the epoch.
    #[diesel(sql_type = diesel::sql_types::Double)]
    began: f64,
    /// The server's timeline then (the first 8 digits of its WAL file name).
    #[diesel(sql_type = Text)]
    timeline: String,
    /// Where the WAL was then.
    #[diesel(sql_type = Text)]
    lsn: String,
}

/// Reads the [`Stamp`] of the transaction open on `conn` (and gives it an id if it had
/// none), whose server is `server`.
pub(crate) fn stamp(conn: &mut PgConnection, server: Identity) -> QueryResult<Stamp> {
    let read = sql_query(
        "SELECT pg_current_xact_id()::text AS xid, \
           extract(epoch FROM now())::float8 AS began, \
           substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8) AS timeline, \
           pg_current_wal_insert_lsn()::text AS lsn",
    )
    .get_result(conn)?;
    Ok(Stamp { read, server })
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
    /// When the last checkpoint began, seconds since the epoch.
    #[diesel(sql_type = BigInt)]
    checkpoint: i64,
    /// Whether the last checkpoint's redo point is past where the WAL was at the stamp.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    checkpoint_after: bool,
    /// Whether the id is at or past the next id the last checkpoint records.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    beyond_checkpoint: bool,
    #[diesel(sql_type = Text)]
    system: String,
    #[diesel(sql_type = Text)]
    started: String,
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
                            timeline_then = %stamp.read.timeline,
                            timeline_now = %now.timeline,
                            same_cluster = now.system == stamp.server.system,
                            same_server = now.started == stamp.server.started,
                            checkpoint_since = now.checkpoint >= stamp.read.began.floor() as i64
                                || now.checkpoint_after,
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
           substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8) AS timeline, \
           c.checkpoint, c.checkpoint_after, \
           $1::text::numeric >= c.next_xid AS beyond_checkpoint, \
           (SELECT system_identifier::text FROM pg_control_system()) AS system, \
           extract(epoch FROM pg_postmaster_start_time())::text AS started \
         FROM (SELECT extract(epoch FROM checkpoint_time)::bigint AS checkpoint, \
                 redo_lsn > $2::pg_lsn AS checkpoint_after, \
                 split_part(next_xid, ':', 1)::numeric * 4294967296 \
                   + split_part(next_xid, ':', 2)::numeric AS next_xid \
               FROM pg_control_checkpoint()) c",
    )
    .bind::<Text, _>(&stamp.read.xid)
    .bind::<Text, _>(&stamp.read.lsn)
    .get_result(conn)
}

/// The outcome the server's answer proves, or `None` while the transaction is in progress.
fn decide(stamp: &Stamp, now: &Now) -> Option<Outcome> {
    if now.system != stamp.server.system || now.timeline != stamp.read.timeline {
        // Another cluster, or another history: its ids are not the write's.
        return Some(Outcome::Unknown);
    }
    let same_server = now.started == stamp.server.started;
    let started_since = now
        .started
        .parse::<f64>()
        .is_ok_and(|started| started > stamp.read.began);
    // A checkpoint's time has whole seconds: one in the second the write began may be later.
    let checkpoint_since =
        now.checkpoint >= stamp.read.began.floor() as i64 || now.checkpoint_after;
    Some(match now.status.as_str() {
        "in progress" => return None,
        "aborted" | "never assigned" if same_server || started_since => Outcome::NotCommitted,
        "committed" if same_server && !checkpoint_since => Outcome::Committed,
        // The cluster restarted since the write began, and the id is past every id its
        // latest checkpoint counts: the checkpoint a restart starts from (a shutdown's, or a
        // crash recovery's end, made before any session) counts every id whose records
        // survived, and later ones count more. So nothing of the write survived; the
        // "committed" is a new transaction's, given the same id.
        "committed" if started_since && now.beyond_checkpoint => Outcome::NotCommitted,
        _ => Outcome::Unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_counts_only_from_the_server_that_handed_out_the_id() {
        let stamp = Stamp {
            read: Read {
                xid: "800".into(),
                began: 1000.25,
                timeline: "00000001".into(),
                lsn: "0/100".into(),
            },
            server: Identity {
                system: "7".into(),
                started: "900.5".into(),
            },
        };
        let now = |status: &str, timeline: &str, checkpoint, system: &str, started: &str| Now {
            status: status.into(),
            timeline: timeline.into(),
            checkpoint,
            checkpoint_after: false,
            beyond_checkpoint: false,
            system: system.into(),
            started: started.into(),
        };
        let same = |status: &str, checkpoint| now(status, "00000001", checkpoint, "7", "900.5");
        assert_eq!(
            decide(&stamp, &same("committed", 999)),
            Some(Outcome::Committed)
        );
        // A checkpoint in the second the write began, or later: maybe a crash's.
        assert_eq!(
            decide(&stamp, &same("committed", 1000)),
            Some(Outcome::Unknown)
        );
        // ... or one whose redo point is past the write's WAL (a clock stepped back).
        let mut after = same("committed", 999);
        after.checkpoint_after = true;
        assert_eq!(decide(&stamp, &after), Some(Outcome::Unknown));
        // A promoted standby, another cluster: nothing counts.
        for other in [
            now("aborted", "00000002", 999, "7", "900.5"),
            now("never assigned", "00000001", 999, "8", "900.5"),
            now("committed", "00000001", 999, "8", "900.5"),
        ] {
            assert_eq!(decide(&stamp, &other), Some(Outcome::Unknown));
        }
        // The same server, or the same cluster restarted since the write began: not
        // committed is proven; committed is not after a restart.
        for status in ["aborted", "never assigned"] {
            assert_eq!(
                decide(&stamp, &same(status, 2000)),
                Some(Outcome::NotCommitted)
            );
            let restarted = now(status, "00000001", 2000, "7", "1000.5");
            assert_eq!(decide(&stamp, &restarted), Some(Outcome::NotCommitted));
            // A server of the cluster that was running before the write began (a
            // sibling standby promoted to the same timeline number): unknown.
            let sibling = now(status, "00000001", 2000, "7", "950");
            assert_eq!(decide(&stamp, &sibling), Some(Outcome::Unknown));
        }
        let mut restarted = now("committed", "00000001", 999, "7", "1001.25");
        assert_eq!(decide(&stamp, &restarted), Some(Outcome::Unknown));
        // ... unless the id is past what the restarted server's checkpoint counts: handed
        // out again, the write's own lost.
        restarted.beyond_checkpoint = true;
        assert_eq!(decide(&stamp, &restarted), Some(Outcome::NotCommitted));
        let mut sibling = now("committed", "00000001", 999, "7", "950");
        sibling.beyond_checkpoint = true;
        assert_eq!(decide(&stamp, &sibling), Some(Outcome::Unknown));
        assert_eq!(decide(&stamp, &same("in progress", 0)), None);
        assert_eq!(
            decide(&stamp, &same("forgotten", 0)),
            Some(Outcome::Unknown)
        );
    }
}
