//! A PostgreSQL server as the layer names it, and the sessions it opens there: the settings
//! every pooled connection gets, and the r2d2 manager that never hands out a lost one.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::r2d2::{ManageConnection, Pool, PooledConnection, R2D2Connection};
use diesel::{Connection, PgConnection};

use super::failure::{self, Recorder};
use crate::error::{Error, Operation};
use crate::options::Options;
use crate::retry::{retry_in, Db, Deadline, Failure, RetryPolicy, Waiting};
use crate::url::redact;

/// The r2d2 pool of a [`PgDatabase`](crate::PgDatabase).
pub type PgPool = Pool<PgManager>;

/// A connection borrowed from a [`PgDatabase`](crate::PgDatabase)'s pool.
pub type PooledPg = PooledConnection<PgManager>;

/// A server's URL, and the same with its password removed, which is all errors and `tracing`
/// events ever show.
#[derive(Clone)]
pub(crate) struct Server {
    url: String,
    shown: String,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Server {
    /// The server `url` names. Unless the URL sets libpq's `connect_timeout`, each connection
    /// attempt gets one: the retry deadline in whole seconds, from 2 (libpq's least) to 10. A
    /// server that accepts and never answers would keep libpq waiting without end.
    ///
    /// Sessions are named after this program (`application_name`, what `pg_stat_activity`,
    /// the server's log and the layer's own [`Holder`](crate::Holder)s name them by) unless
    /// the URL or `PGAPPNAME` names them: libpq's `fallback_application_name`, sent when the
    /// session starts. A `SET` would stay behind a transaction pooler on its server
    /// connection, for the pooler's other clients.
    pub(crate) fn new(url: &str, options: &Options) -> Self {
        let timeout = options
            .retry
            .deadline()
            .as_secs_f64()
            .ceil()
            .clamp(2.0, MAX_CONNECT_TIMEOUT.as_secs_f64()) as u64;
        let mut connect =
            crate::url::with_default_param(url, "connect_timeout", &timeout.to_string());
        if let Some(name) = program_name() {
            connect = crate::url::with_default_param(&connect, "fallback_application_name", &name);
        }
        Self {
            url: connect,
            shown: redact(url),
        }
    }

    /// The URL to connect with.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The URL without its password.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    /// The URL without its password, as `tracing` events name the database.
    pub(crate) fn namespace(&self) -> &dyn std::fmt::Display {
        &self.shown
    }
}

/// The settings every session of the layer's starts with: the options' timeouts.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub statement_timeout: Option<Duration>,
    pub lock_timeout: Duration,
    pub idle_in_transaction_timeout: Option<Duration>,
    /// A transaction pooler keeps no session state ([`Options::transaction_pooling`]): the
    /// timeouts go `LOCAL` into each transaction instead (`pooler::local_settings`), and
    /// Diesel prepares no statement to keep.
    pub transaction_pooling: bool,
    /// Whether a lost `COMMIT` is asked about: the session records its server's identity.
    pub lost_commit_lookup: bool,
}

impl Settings {
    pub(crate) fn new(options: &Options) -> Self {
        Self {
            statement_timeout: options.statement_timeout,
            lock_timeout: options.lock_timeout,
            idle_in_transaction_timeout: options.idle_in_transaction_timeout,
            transaction_pooling: options.transaction_pooling,
            lost_commit_lookup: options.lost_commit_lookup,
        }
    }

    /// What [`sql`](Settings::sql) sets, as `set_config` calls for the columns of a
    /// `SELECT` (each named `set_N`), or an empty string.
    pub(crate) fn set_config(&self) -> String {
        let mut calls = Vec::new();
        if !self.transaction_pooling {
            for (name, value) in [
                ("statement_timeout", millis(self.statement_timeout)),
                ("lock_timeout", millis(Some(self.lock_timeout))),
                (
                    "idle_in_transaction_session_timeout",
                    millis(self.idle_in_transaction_timeout),
                ),
            ] {
                calls.push(format!("set_config('{name}', '{value}', false)"));
            }
        }
        calls
            .iter()
            .enumerate()
            .map(|(i, call)| format!(", {call} AS set_{i}"))
            .collect()
    }

    /// The `SET` statements, one batch; none behind a transaction pooler.
    pub(crate) fn sql(&self) -> String {
        if self.transaction_pooling {
            return String::new();
        }
        format!(
            "SET statement_timeout = {}; SET lock_timeout = {}; \
             SET idle_in_transaction_session_timeout = {};",
            millis(self.statement_timeout),
            millis(Some(self.lock_timeout)),
            millis(self.idle_in_transaction_timeout),
        )
    }
}

/// This program's name, as a session's `application_name`: the executable's file name, kept
/// to the characters that need no quoting, at most 63 bytes (the server's limit).
fn program_name() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    let name: String = exe
        .file_name()?
        .to_string_lossy()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(63)
        .collect();
    (!name.is_empty()).then_some(name)
}

/// A timeout setting in milliseconds; `0` (PostgreSQL's "none") for `None`, at least 1 ms
/// otherwise (0 would turn it off).
pub(crate) fn millis(timeout: Option<Duration>) -> u128 {
    timeout.map_or(0, |t| t.as_millis().clamp(1, i32::MAX as u128))
}

/// The longest `connect_timeout` the layer gives an attempt of its own accord.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an open waits for an unavailable server before it says so once (see `open`).
const WAITING_SAID_AFTER: Duration = Duration::from_secs(1);

/// Opens a session on `server` as [`connect`] does, trying again (with `policy`'s jittered
/// backoff, until `deadline`, each retry traced) while the server is unavailable: not
/// listening yet, starting up, shutting down or in recovery (57P03), full (53300), not
/// answering within `connect_timeout`, or a standby where the URL asks for a writable
/// session (see [`unavailable`]).
///
/// # Errors
/// [`Error::Connect`] (the last attempt's) if it never opened; [`Error::Query`] if the
/// session's settings failed.
pub(crate) fn open(
    server: &Server,
    settings: &Settings,
    policy: &RetryPolicy,
    deadline: Deadline<'_>,
) -> Result<PgConnection, Error> {
    let db = Db {
        system: super::DB_SYSTEM,
        namespace: server.namespace(),
    };
    // Each retry is an event of the retry loop's, which a program may keep quiet (the
    // command line shows only its last); a wait that goes on is said once, here.
    let started = std::time::Instant::now();
    let said = std::cell::Cell::new(false);
    let transient = |error: &Error| {
        let waiting = match error {
            Error::Connect { source, .. } => unavailable(source).then_some(Waiting::Unavailable),
            Error::Query { source, .. } => super::failure::failure(source)
                .filter(|f| f.kind == super::PgFailureKind::ConnectionLost)
                .map(|f| f.kind.waiting()),
            _ => None,
        };
        if waiting.is_some() && !said.get() && started.elapsed() >= WAITING_SAID_AFTER {
            said.set(true);
            tracing::warn!(
                db.system.name = super::DB_SYSTEM,
                db.namespace = %server.namespace(),
                waited_ms = started.elapsed().as_millis() as u64,
                error = %crate::escaped::Escaped::new(&crate::error::error_chain(error)),
                "waiting for the server, until the retry deadline"
            );
        }
        waiting
    };
    retry_in(
        policy,
        deadline,
        Operation::Connect,
        db,
        transient,
        |error: &Error| crate::error::error_chain(error),
        |_| connect_once(server, settings),
    )
    .map(|success| success.value)
    .map_err(|failure| match failure {
        Failure::Permanent(error) | Failure::Exhausted { last: error, .. } => error,
    })
}

/// One attempt of [`open`]: [`connect`], its failure as the layer's error.
pub(crate) fn connect_once(server: &Server, settings: &Settings) -> Result<PgConnection, Error> {
    connect(server.url(), settings).map_err(|error| match error {
        SessionError::Connect(source) => Error::Connect {
            url: server.shown().to_owned(),
            source,
        },
        SessionError::Settings(source) => Error::query(Operation::ConfigureSession, source),
    })
}

/// Whether a connection attempt failed because the server was unavailable for now, by
/// libpq's message (a failed connection carries no SQLSTATE): nothing listening yet, a
/// socket's backlog full, a server starting, shutting down or in recovery (57P03), one with
/// no free connection slot (53300), one that did not answer in time, or one that closed the
/// connection; or, for a URL that asks for a writable session
/// (`target_session_attrs=read-write` or `primary`), every server it names a standby or
/// read-only for now: during a failover, until the standby is promoted (or a writer
/// endpoint's name moves to it). libpq's own messages are English in a program that never
/// called `setlocale`; a server's are in its `lc_messages`: its refusals are also read in
/// the other languages of its catalogs (see `messages`).
pub(crate) fn unavailable(error: &diesel::ConnectionError) -> bool {
    let message = match error {
        diesel::ConnectionError::BadConnection(message) => message,
        // Connected, then lost while Diesel set the session up (`SET TIME ZONE`): ended by
        // the server or an administrator meanwhile.
        diesel::ConnectionError::CouldntSetupConfiguration(error) => {
            return super::failure::transient(error)
                == Some(super::failure::PgFailureKind::ConnectionLost)
        }
        _ => return false,
    };
    // One line per server tried: `connection to server on socket "PATH" failed: CAUSE` (or
    // `at "HOST" (ADDRESS), port N`), and libpq before 14: `could not connect to server:
    // CAUSE`. A name (a database, a role, a socket path) is never read as the cause: the
    // server's refusal must be one of its messages whole, a name only where its `%s` is.
    message.lines().any(|line| {
        let cause = line
            .split_once("failed: ")
            .map(|(_, cause)| cause)
            .or_else(|| line.strip_prefix("could not connect to server: "))
            .unwrap_or(line)
            .trim();
        match cause.split_once(":  ") {
            // The server's, after its severity (`FATAL`, or its translation).
            Some((_, said)) => REFUSED
                .iter()
                .chain(super::messages::TRANSLATED)
                .any(|template| said_as(said.trim_end(), template)),
            None => UNREACHABLE.iter().any(|start| cause.starts_with(start)),
        }
    })
}

/// libpq's own causes of a failed connection that may pass: nothing listening yet, a
/// socket's backlog full, a connection lost or not answered in time; with
/// `target_session_attrs=read-write` (libpq 10-13, and 14 on) or `primary`, a standby or a
/// read-only server.
const UNREACHABLE: [&str; 12] = [
    "Connection refused",
    "No such file or directory",
    "Resource temporarily unavailable",
    "Connection reset by peer",
    "Connection timed out",
    "No route to host",
    "Network is unreachable",
    "timeout expired",
    "server closed the connection unexpectedly",
    "session is read-only",
    "server is in hot standby mode",
    "could not make a writable connection to server",
];

/// Whether `error`, from a step of an open after its first connection, is a session lost
/// meanwhile (its server restarting, or `pg_terminate_backend`): the open runs again.
pub(crate) fn lost_during_open(error: &Error) -> bool {
    match error {
        Error::Query { source, .. } | Error::Storage { source, .. } => {
            super::failure::transient(source) == Some(super::failure::PgFailureKind::ConnectionLost)
        }
        _ => false,
    }
}

/// The server's refusals for now, in English (57P03 and 53300; see `messages` for the other
/// languages): whole messages, `%s` where a name goes, the reserved slots' cut short; a
/// session ended while it started (57P01, English only); and PgBouncer's (never
/// translated): its clients all taken, its logins to the server failing for now, the server
/// not reached.
const REFUSED: [&str; 13] = [
    "terminating connection due to administrator command",
    "no more connections allowed (max_client_conn)",
    "server login has been failing, try again later (server_login_retry)",
    "pgbouncer cannot connect to server",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
    "sorry, too many clients already",
    "remaining connection slots are reserved",
    "too many connections for role \"%s\"",
    "too many connections for database \"%s\"",
];

/// Whether the server's message `said` is `template`: the same words around its one `%s`
/// (whatever name is there), or, without one, the same first words.
fn said_as(said: &str, template: &str) -> bool {
    match template.split_once("%s") {
        Some((before, after)) => {
            said.len() >= before.len() + after.len()
                && said.starts_with(before)
                && said.ends_with(after)
        }
        None => said.starts_with(template),
    }
}

#[cfg(test)]
mod unavailable_tests {
    use super::*;

    #[test]
    fn a_quoted_name_is_never_read_as_the_cause() {
        let bad = |m: &str| diesel::ConnectionError::BadConnection(m.to_owned());
        assert!(unavailable(&bad(
            "connection to server on socket \"/tmp/.s.PGSQL.5432\" failed: No such file or directory"
        )));
        assert!(!unavailable(&bad(
            "connection to server on socket \"/tmp/.s.PGSQL.5432\" failed: FATAL:  database \
             \"No such file or directory\" does not exist"
        )));
        assert!(unavailable(&bad(
            "connection to server at \"db\" failed: FATAL:  sorry, too many clients already"
        )));
    }

    #[test]
    fn a_poolers_refusal_for_now_is_waited_out() {
        let bad = |m: &str| diesel::ConnectionError::BadConnection(m.to_owned());
        // As libpq shows PgBouncer 1.18's.
        for refusal in [
            "no more connections allowed (max_client_conn)",
            "server login has been failing, try again later (server_login_retry)",
            "pgbouncer cannot connect to server",
        ] {
            assert!(unavailable(&bad(&format!(
                "connection to server on socket \"/tmp/b/.s.PGSQL.6441\" failed: FATAL:  {refusal}\n"
            ))));
        }
        assert!(!unavailable(&bad(
            "connection to server on socket \"/tmp/b/.s.PGSQL.6441\" failed: FATAL:  no such database: x"
        )));
    }

    #[test]
    fn a_refusal_in_the_servers_language_is_read_too() {
        let bad = |m: &str| diesel::ConnectionError::BadConnection(m.to_owned());
        for message in [
            "FATAL:  die verbleibenden Verbindungen sind für Superuser auf \
             Nicht-Replikationsverbindungen reserviert",
            "FATAL:  das Datenbanksystem startet",
            "ВАЖНО:  система баз данных запускается",
            "致命的エラー:  現在クライアント数が多すぎます",
            "致命错误:  到数据库 \"app\"的连接太多了",
            "FATAL:  trop de connexions pour le rôle « app »",
        ] {
            assert!(unavailable(&bad(message)), "{message}");
        }
        // Not a refusal for now, in German either: the database does not exist.
        assert!(!unavailable(&bad(
            "FATAL:  Datenbank »app« existiert nicht"
        )));
        // Nor when a name is worded as one, in any quotes, or holds a quote of its own.
        for message in [
            "connection to server on socket \"/tmp/.s.PGSQL.5432\" failed: FATAL:  Datenbank \
             »das Datenbanksystem fährt herunter« existiert nicht",
            "connection to server on socket \"/tmp/.s.PGSQL.5432\" failed: FATAL:  Rolle »zu \
             viele Verbindungen von Rolle« existiert nicht",
            "connection to server on socket \"/tmp/.s.PGSQL.5432\" failed: FATAL:  database \
             \"x\"sorry, too many clients already\" does not exist",
            "connection to server on socket \"/tmp/.s.PGSQL.5432\" failed: FATAL:  password \
             authentication failed for user \"the database system is starting up\"",
        ] {
            assert!(!unavailable(&bad(message)), "{message}");
        }
        // A name where the refusal puts one is no obstacle.
        assert!(unavailable(&bad(
            "connection to server on socket \"/tmp/.s.PGSQL.5432\" failed: FATAL:  too many \
             connections for role \"a \"quoted\" one\""
        )));
        assert!(unavailable(&bad(
            "could not connect to server: Connection refused"
        )));
    }
}

/// Opens a session: connects, installs the failure recorder, applies `settings`.
pub(crate) fn connect(url: &str, settings: &Settings) -> Result<PgConnection, SessionError> {
    let mut conn = PgConnection::establish(url).map_err(SessionError::Connect)?;
    conn.set_instrumentation(Recorder::new());
    if settings.transaction_pooling {
        // A statement prepared on one server connection is missing on the next one's.
        conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Disabled);
    }
    if settings.lost_commit_lookup {
        // The settings and the server's identity in one round trip; a role that may not
        // read the identity gets the settings alone.
        let server = super::outcome::identify_setting(&mut conn, &settings.set_config());
        if server.is_none() {
            apply(&mut conn, settings)?;
        }
        failure::set_server(&mut conn, server);
    } else {
        apply(&mut conn, settings)?;
    }
    Ok(conn)
}

fn apply(conn: &mut PgConnection, settings: &Settings) -> Result<(), SessionError> {
    let sql = settings.sql();
    if !sql.is_empty() {
        conn.batch_execute(&sql).map_err(SessionError::Settings)?;
    }
    Ok(())
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error(transparent)]
    Connect(diesel::ConnectionError),
    #[error("cannot apply the session settings")]
    Settings(#[source] diesel::result::Error),
}

/// The pool's error handler: r2d2 tries a failed connection again until the checkout's
/// time-out; each failure is traced at `warn`, as the open's retries are.
#[derive(Debug)]
pub(crate) struct TraceConnectErrors {
    pub(crate) shown: String,
}

impl diesel::r2d2::HandleError<diesel::r2d2::Error> for TraceConnectErrors {
    fn handle_error(&self, error: diesel::r2d2::Error) {
        tracing::warn!(
            db.system.name = super::DB_SYSTEM,
            db.namespace = %crate::escaped::Escaped::new(&self.shown),
            operation = Operation::Connect.as_str(),
            error = %crate::escaped::Escaped::new(&error.to_string()),
            "cannot open a session for the pool, trying again"
        );
    }
}

/// The connection manager of a [`PgPool`]: Diesel's, except that each session starts with
/// the layer's settings and its failure recorder, and that a connection that was lost is
/// closed instead of going back to the pool (Diesel's check only looks at its transaction
/// state, which a failed `BEGIN` leaves clean).
pub struct PgManager {
    url: String,
    settings: Settings,
    /// A session opened before the pool (the open's own), handed out by the first connect.
    spare: std::sync::Mutex<Option<PgConnection>>,
}

impl std::fmt::Debug for PgManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgManager")
            .field("url", &redact(&self.url))
            .finish_non_exhaustive()
    }
}

impl PgManager {
    pub(crate) fn new(server: &Server, settings: Settings) -> Self {
        Self {
            url: server.url().to_owned(),
            settings,
            spare: std::sync::Mutex::new(None),
        }
    }

    /// Keeps `conn`, a session of [`connect`]'s opened with these settings (perhaps without
    /// the server's identity, and its statement cache off), for the first connect: unless it
    /// was lost, or is left in a transaction.
    pub(crate) fn keep_spare(&self, mut conn: PgConnection) {
        if failure::lost(&mut conn) || R2D2Connection::is_broken(&mut conn) {
            return;
        }
        *self
            .spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(conn);
    }

    /// The spare session, made a pooled one: its statement cache on (unless behind a
    /// transaction pooler) and its server's identity recorded.
    fn take_spare(&self) -> Option<PgConnection> {
        let mut conn = self
            .spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()?;
        if !self.settings.transaction_pooling {
            conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Unbounded);
        }
        if self.settings.lost_commit_lookup && failure::server(&mut conn).is_none() {
            let server = super::outcome::identify(&mut conn);
            failure::set_server(&mut conn, server);
        }
        Some(conn)
    }
}

impl ManageConnection for PgManager {
    type Connection = PgConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<PgConnection, diesel::r2d2::Error> {
        if let Some(conn) = self.take_spare() {
            return Ok(conn);
        }
        connect(&self.url, &self.settings).map_err(|error| match error {
            SessionError::Connect(e) => diesel::r2d2::Error::ConnectionError(e),
            SessionError::Settings(e) => diesel::r2d2::Error::QueryError(e),
        })
    }

    fn is_valid(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute("SELECT 1")
            .map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut PgConnection) -> bool {
        std::thread::panicking() || failure::lost(conn) || R2D2Connection::is_broken(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_refusing_a_writable_session_is_waited_for() {
        let refused = |message: &str| {
            unavailable(&diesel::ConnectionError::BadConnection(format!(
                "connection to server on socket \"/tmp/b/.s.PGSQL.5432\" failed: {message}\n"
            )))
        };
        // libpq 15 with target_session_attrs=read-write, and =primary.
        assert!(refused("session is read-only"));
        assert!(refused("server is in hot standby mode"));
        assert!(!refused(
            "FATAL:  password authentication failed for user \"app\""
        ));
        assert!(!refused("FATAL:  database \"app\" does not exist"));
    }

    #[test]
    fn timeouts_are_milliseconds_and_none_is_zero() {
        assert_eq!(millis(None), 0);
        assert_eq!(millis(Some(Duration::from_micros(10))), 1);
        assert_eq!(millis(Some(Duration::from_secs(5))), 5000);
    }
}
