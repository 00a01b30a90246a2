//! Who holds what a PostgreSQL operation waited for, from the server's own views
//! (`pg_locks`, `pg_stat_activity`), for [`Error::Busy`](crate::Error::Busy) and the status.

use std::time::{Duration, SystemTime};

use diesel::sql_types::{Bool, Double, Integer, Nullable, Text};
use diesel::{sql_query, PgConnection, QueryResult, QueryableByName, RunQueryDsl};

use crate::holders::{HeldLock, Holder};

#[derive(QueryableByName)]
struct Session {
    #[diesel(sql_type = Integer)]
    pid: i32,
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Nullable<Double>)]
    since: Option<f64>,
    #[diesel(sql_type = Bool)]
    hidden: bool,
    /// Not idle outside a transaction (or hidden: not known).
    #[diesel(sql_type = Bool)]
    busy: bool,
}

impl Session {
    fn holder(self, lock: HeldLock) -> Holder {
        Holder {
            pid: self.pid as u32,
            command: Some(self.name),
            lock,
            // A session holding the migration lock while it works: migrating. One idle
            // outside a transaction holds it and does nothing.
            operation: (lock == HeldLock::MigrationLock && self.busy)
                .then_some(crate::operation::Operation::Migrate),
            since: self
                .since
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .map(|s| SystemTime::UNIX_EPOCH + s),
            hidden: self.hidden,
        }
    }
}

/// The sessions holding the advisory lock `key` of this database (the migration lock, or the
/// write queue's turn), as holders of `lock`: other sessions than `conn`'s (which is the
/// asking operation's own, when it held the lock).
pub(crate) fn advisory(
    conn: &mut PgConnection,
    key: (i32, i32),
    lock: HeldLock,
) -> QueryResult<Vec<Holder>> {
    Ok(sql_query(
        "SELECT l.pid, coalesce(a.application_name, '') AS name, \
           extract(epoch FROM coalesce(a.xact_start, a.query_start))::float8 AS since, \
           (a.state IS NULL) AS hidden, coalesce(a.state <> 'idle', true) AS busy \
         FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
           AND l.mode = 'ExclusiveLock' \
           AND l.pid <> pg_backend_pid() \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.classid = ($1::bigint & 4294967295)::oid \
           AND l.objid = ($2::bigint & 4294967295)::oid \
         ORDER BY l.pid",
    )
    .bind::<Integer, _>(key.0)
    .bind::<Integer, _>(key.1)
    .load::<Session>(conn)?
    .into_iter()
    .map(|s| s.holder(lock))
    .collect())
}

/// The sessions (other than `conn`'s) whose write transaction has been open for at least
/// `open_for`, oldest first: what a lock wait that long waited for. Found by the lock every
/// write transaction holds on its own id (`pg_locks`, which every role may read), so that a
/// session whose activity this role may not see is named too, as hidden (whether it was open
/// for the whole wait is not known then).
pub(crate) fn write_transactions(
    conn: &mut PgConnection,
    open_for: Duration,
) -> QueryResult<Vec<Holder>> {
    Ok(sql_query(
        "SELECT l.pid, coalesce(a.application_name, '') AS name, \
           extract(epoch FROM a.xact_start)::float8 AS since, \
           (a.state IS NULL) AS hidden, coalesce(a.state <> 'idle', true) AS busy \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted \
           AND l.pid <> pg_backend_pid() AND a.datname = current_database() \
           AND (a.state IS NULL OR a.xact_start <= now() - make_interval(secs => $1)) \
         ORDER BY a.xact_start NULLS LAST, l.pid LIMIT 8",
    )
    .bind::<Double, _>(open_for.as_secs_f64())
    .load::<Session>(conn)?
    .into_iter()
    .map(|s| s.holder(HeldLock::ServerTransaction))
    .collect())
}
