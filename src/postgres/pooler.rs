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

use std::sync::mpsc;
use std::time::Duration;

use diesel::sql_types::{Integer, Text};
use diesel::{PgConnection, QueryResult, QueryableByName, RunQueryDsl};

use super::session::{millis, Settings};
use crate::error::{Error, Operation, Result};
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

/// What [`detect`] found, and its first session: once no pooler was found, the open's own.
pub(crate) struct Checked {
    pub pooler: Option<String>,
    pub first: PgConnection,
}

/// Whether the server behind `connect` is a transaction pooler: `Some(what was seen)` if it
/// is; `None` if none was found (see the module docs). `connect` opens a session of the
/// layer's with [`probe`] settings; the check opens two, and hands back the first. A second
/// session that cannot be opened ends the check (logged).
///
/// # Errors
/// What opening the first session failed with, and what a statement of the check failed
/// with.
pub(crate) fn detect(
    mut first: PgConnection,
    second: impl FnOnce() -> Result<PgConnection> + Send + 'static,
) -> Result<Checked> {
    let pooler = seen(&mut first, second)?;
    Ok(Checked { pooler, first })
}

/// How long the check waits for its second session: a pooler with one server connection
/// per user (or a session pooler) makes it wait for the first session's, which it never
/// gets.
const SECOND_SESSION_WAIT: Duration = Duration::from_secs(5);

fn seen(
    first: &mut PgConnection,
    connect: impl FnOnce() -> Result<PgConnection> + Send + 'static,
) -> Result<Option<String>> {
    fn query(source: diesel::result::Error) -> Error {
        Error::query(Operation::ConfigureSession, source)
    }
    fn on(conn: &mut PgConnection) -> Result<Process> {
        process(conn).map_err(query)
    }
    let a = on(first)?;
    let b = on(first)?;
    let moved = |from: &Process, to: &Process| {
        format!(
            "one session's statements ran on server processes {} and {}",
            from.pid, to.pid
        )
    };
    if a != b {
        return Ok(Some(moved(&a, &b)));
    }
    // The second session on a thread of its own, waited for a bounded time: it keeps its
    // transaction open until the first session's last statement is done (or this gives up
    // on it), then closes, which ends the transaction on whatever server connection it had.
    let (answer, answered) = mpsc::channel();
    let (done, finish) = mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("sqlite-persistence-pooler-check".into())
        .spawn(move || {
            let result = connect().and_then(|mut second| {
                diesel::connection::SimpleConnection::batch_execute(&mut second, "BEGIN")
                    .map_err(query)?;
                let other = on(&mut second)?;
                Ok((second, other))
            });
            match result {
                Ok((second, other)) => {
                    let _ = answer.send(Ok(other));
                    let _ = finish.recv_timeout(SECOND_SESSION_WAIT);
                    drop(second);
                }
                Err(error) => {
                    let _ = answer.send(Err(error));
                }
            }
        });
    let checked_with_one = |why: &str| {
        tracing::warn!(
            error = %crate::escaped::Escaped::new(why),
            "cannot use a second session to check for a transaction pooler; checked with one"
        );
        Ok(None)
    };
    if let Err(error) = spawned {
        return checked_with_one(&error.to_string());
    }
    let other = match answered.recv_timeout(SECOND_SESSION_WAIT) {
        Ok(Ok(other)) => other,
        Ok(Err(error)) => return checked_with_one(&crate::error::error_chain(&error)),
        Err(_) => {
            return checked_with_one(&format!(
                "it had no answer in {} s",
                SECOND_SESSION_WAIT.as_secs()
            ))
        }
    };
    let result = if other == b {
        Ok(Some(format!(
            "two sessions ran on server process {}",
            b.pid
        )))
    } else {
        let c = on(first)?;
        Ok((c != b).then(|| moved(&b, &c)))
    };
    drop(done);
    result
}

/// `error`, or [`Error::StatementPooling`] if it is the loss of the session at the first
/// transaction of an open or of a status read (the statements before it ran outside a
/// transaction) and `server` is a statement pooler (see [`statement_pooler`]).
pub(crate) fn lost_at_first_begin(
    error: Error,
    server: &super::session::Server,
    settings: &Settings,
) -> Error {
    match &error {
        Error::Query {
            operation: Operation::ReadMigrationState | Operation::ReadStatus,
            source,
        } if super::failure::transient(source)
            == Some(super::failure::PgFailureKind::ConnectionLost)
            && statement_pooler(server, settings) =>
        {
            Error::StatementPooling {
                url: server.shown().to_owned(),
            }
        }
        _ => error,
    }
}

/// Whether `server` is a pooler in statement pooling mode (PgBouncer's `pool_mode =
/// statement`), which closes every session that begins a transaction. Asks two fresh
/// sessions (with [`probe`] settings) in turn: each must run a statement outside a
/// transaction, and then be lost at its `BEGIN`. A server that went away refuses a session
/// or loses it at its first statement; one that came back runs its `BEGIN`; a session
/// ended by somebody else (`pg_terminate_backend`) right at its `BEGIN` is not ended so
/// twice in a row but by a storm of them.
pub(crate) fn statement_pooler(server: &super::session::Server, settings: &Settings) -> bool {
    use diesel::connection::SimpleConnection;
    let closed_at_begin = || {
        let Ok(mut conn) = super::session::connect_once(server, &probe(settings)) else {
            return false;
        };
        if process(&mut conn).is_err() {
            return false;
        }
        match conn.batch_execute("BEGIN") {
            Ok(()) => false,
            Err(error) => {
                super::failure::transient(&error)
                    == Some(super::failure::PgFailureKind::ConnectionLost)
                    && super::failure::lost(&mut conn)
            }
        }
    };
    closed_at_begin() && closed_at_begin()
}

/// The settings of the check's sessions: those of a session behind a declared transaction
/// pooler, which sets nothing a pooler would leave on a server connection for its other
/// clients. The open's
/// sessions write nothing that could lose a `COMMIT`: they record no server identity.
pub(crate) fn probe(settings: &Settings) -> Settings {
    Settings {
        transaction_pooling: true,
        lost_commit_lookup: false,
        ..settings.clone()
    }
}

/// The settings a transaction behind a transaction pooler takes back to their defaults: the
/// pooler's other clients may have set them on the server connection (a session `SET` stays
/// there), and they change what the layer's statements do: where unqualified names go
/// (`search_path`, `default_tablespace`), whether a commit is durable
/// (`synchronous_commit`), whether triggers and foreign keys fire
/// (`session_replication_role`), whether row security applies (`row_security`). And
/// `default_transaction_read_only`, which a write's `BEGIN` overrides with `READ WRITE`
/// when the default is off. The role too (see [`Pinned::read`]).
const PINNED: [&str; 6] = [
    "search_path",
    "default_tablespace",
    "synchronous_commit",
    "session_replication_role",
    "row_security",
    "default_transaction_read_only",
];

/// What a transaction behind a declared transaction pooler does to run with the database's
/// settings (see [`PINNED`]), whatever the pooler's other clients left on the server
/// connection; nothing elsewhere.
#[derive(Clone, Debug, Default)]
pub(crate) struct Pinned {
    /// Run first in a transaction, after any wait for the write queue's turn (it is a
    /// `SELECT`, which takes the transaction's snapshot): each setting that differs from
    /// its default is set back `LOCAL` (one the session may not set fails the transaction,
    /// instead of running without its triggers). Empty where nothing is pinned.
    pub select: String,
    /// Appended to a write's `BEGIN`: ` READ WRITE` unless the default is read-only.
    pub read_write: &'static str,
}

#[derive(QueryableByName)]
struct Reset {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    value: String,
}

impl Pinned {
    /// The database's defaults for [`PINNED`] (what `RESET` gives: the server's, the
    /// database's and the role's configuration, not a session `SET`), and the role's, read
    /// on `conn` in one round trip.
    ///
    /// The role, which `pg_settings` does not show, is the session user's own, or the one
    /// `ALTER ROLE ... [IN DATABASE ...] SET role` gives it (this database's first). A
    /// neighbour's `SET ROLE` would make the layer's statements another role's, and
    /// `"$user"` in the search path another schema; so it is set first (the search path's
    /// `"$user"` is read as each statement runs).
    pub(crate) fn read(conn: &mut PgConnection) -> QueryResult<Self> {
        let resets: Vec<Reset> = diesel::sql_query(
            "SELECT name, value FROM (\
               SELECT 'role'::text AS name, coalesce((SELECT substr(c, 6) \
                 FROM pg_db_role_setting s, unnest(s.setconfig) c \
                 WHERE s.setrole = (SELECT oid FROM pg_roles WHERE rolname = session_user) \
                 AND s.setdatabase IN (0, (SELECT oid FROM pg_database \
                   WHERE datname = current_database())) AND c LIKE 'role=%' \
                 ORDER BY s.setdatabase DESC LIMIT 1), 'none')::text AS value \
               UNION ALL SELECT name::text, coalesce(reset_val, '')::text \
                 FROM pg_settings WHERE name = ANY($1)) settings \
             ORDER BY name <> 'role'",
        )
        .bind::<diesel::sql_types::Array<Text>, _>(&PINNED[..])
        .load(conn)?;
        let quoted = |text: &str| format!("'{}'", text.replace('\'', "''"));
        let mut calls = Vec::new();
        let mut read_write = " READ WRITE";
        for Reset { name, value } in resets {
            if name == "default_transaction_read_only" {
                if value != "off" {
                    read_write = "";
                }
                continue;
            }
            let (name, value) = (quoted(&name), quoted(&value));
            calls.push(format!(
                "CASE WHEN current_setting({name}) IS DISTINCT FROM {value} \
                 THEN set_config({name}, {value}, true) END"
            ));
        }
        let select = format!("SELECT {}", calls.join(", "));
        Ok(Self { select, read_write })
    }

    /// [`select`](Pinned::select) as the next statement of a batch: `; SELECT ...`, or
    /// nothing.
    pub(crate) fn next_in_batch(&self) -> String {
        if self.select.is_empty() {
            String::new()
        } else {
            format!("; {}", self.select)
        }
    }
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
