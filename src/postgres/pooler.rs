//! Transaction poolers (PgBouncer's `pool_mode = transaction`): finding one at open, and
//! what a session of the layer's does instead of keeping state in the server's session when
//! the options declare one ([`Options::transaction_pooling`]).
//!
//! Behind a transaction pooler each transaction, and each statement outside one, runs on
//! whichever server connection is free. A session `SET` stays on the server connection it
//! ran on, for the pooler's other clients, and is missing from the next one; a session
//! advisory lock is taken on one server connection and released (or not: "you don't own a
//! lock") on another, held until the pooler closes it; a statement Diesel prepared and
//! cached is missing on the next transaction's server connection ("prepared statement
//! \"__diesel_stmt_0\" does not exist"), or already there for another client ("already
//! exists"). What holds is what a transaction holds: `SET LOCAL`, `pg_advisory_xact_lock`,
//! and statements parsed and run in one step (Diesel does so for a statement it does not
//! cache).
//!
//! # The check at open
//! No statement tells a pooler from the server: the pooler answers for the server. What
//! tells them apart is that a session's server process can change. On the server itself,
//! and behind a session pooler, it never does, and two live sessions never share one; so
//! the check can refuse wrongly only if two servers behind one URL give two sessions the
//! same process id and start time. It looks three ways, which together catch PgBouncer
//! however it hands out its idle server connections:
//! 1. Two statements in a row of one session (a pooler that hands out server connections in
//!    turn, `server_round_robin`, moves it).
//! 2. A second session's transaction, while the first is idle (a pooler that hands out the
//!    server connection used last, PgBouncer's default, or that has only one, gives it the
//!    first session's).
//! 3. The first session's next statement while that transaction is open (the first
//!    session's server connection, if the second has it, is busy).

use diesel::sql_types::{Integer, Text};
use diesel::{Connection, PgConnection, QueryResult, QueryableByName, RunQueryDsl};

use super::session::millis;
use crate::options::Options;

/// A server process: its id, and when its server started (two servers behind one URL can
/// hand out the same id).
#[derive(QueryableByName, Debug, PartialEq, Eq)]
struct Process {
    #[diesel(sql_type = Integer)]
    pid: i32,
    #[diesel(sql_type = Text)]
    started: String,
}

fn process(conn: &mut PgConnection) -> QueryResult<Process> {
    // Parsed and run in one step (Diesel caches no `sql_query`): a pooler may move the
    // session between the steps of a prepared statement.
    diesel::sql_query("SELECT pg_backend_pid() AS pid, pg_postmaster_start_time()::text AS started")
        .get_result(conn)
}

/// Whether `url` leads to a transaction pooler: `Some(what was seen)` if it does; `None` if
/// none was found (see the module docs). Opens two sessions of its own, without the layer's
/// settings: a session `SET` through a pooler would stay behind on its server connection.
/// A session that cannot be opened ends the check (logged): the open's own connect then
/// reports the failure, or retries it.
///
/// # Errors
/// What a statement of the check failed with.
pub(crate) fn detect(url: &str) -> QueryResult<Option<String>> {
    let establish = || {
        PgConnection::establish(url)
            .map_err(|error| {
                tracing::warn!(
                    error = %crate::escaped::Escaped::new(&error.to_string()),
                    "cannot open a session to check for a transaction pooler; not checked"
                );
            })
            .ok()
    };
    let Some(mut first) = establish() else {
        return Ok(None);
    };
    let a = process(&mut first)?;
    let b = process(&mut first)?;
    let moved = |from: &Process, to: &Process| {
        format!(
            "one session's statements ran on server processes {} and {}",
            from.pid, to.pid
        )
    };
    if a != b {
        return Ok(Some(moved(&a, &b)));
    }
    let Some(mut second) = establish() else {
        return Ok(None);
    };
    // Ended by closing the session: nothing of it stays on a server connection.
    diesel::connection::SimpleConnection::batch_execute(&mut second, "BEGIN")?;
    let other = process(&mut second)?;
    if other == b {
        return Ok(Some(format!(
            "two sessions ran on server process {}",
            b.pid
        )));
    }
    let c = process(&mut first)?;
    if c != b {
        return Ok(Some(moved(&b, &c)));
    }
    Ok(None)
}

/// What each transaction of a `write` or `read` sets `LOCAL` after its `BEGIN` (in the same
/// batch), beyond its `lock_timeout`: the session's timeouts when a transaction pooler keeps
/// no session settings ([`Options::transaction_pooling`]), else nothing.
pub(crate) fn local_settings(options: &Options) -> String {
    if !options.transaction_pooling {
        return String::new();
    }
    format!(
        "; SET LOCAL statement_timeout = {}; SET LOCAL idle_in_transaction_session_timeout = {}",
        millis(options.statement_timeout),
        millis(options.idle_in_transaction_timeout),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn only_a_declared_pooler_sets_the_timeouts_in_each_transaction() {
        let options = Options::new()
            .statement_timeout(Some(Duration::from_secs(2)))
            .idle_in_transaction_timeout(None);
        assert_eq!(local_settings(&options), "");
        assert_eq!(
            local_settings(&options.transaction_pooling(true)),
            "; SET LOCAL statement_timeout = 2000; SET LOCAL idle_in_transaction_session_timeout = 0"
        );
    }
}
