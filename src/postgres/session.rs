//! A PostgreSQL server as the layer names it, and the sessions it opens there: the settings
//! every pooled connection gets, and the r2d2 manager that never hands out a lost one.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::r2d2::{ManageConnection, Pool, PooledConnection, R2D2Connection};
use diesel::{Connection, PgConnection};

use super::failure::{self, Recorder};
use crate::options::Options;
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
    pub(crate) fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
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

/// The settings every session of the layer's starts with: the options' timeouts and its
/// `application_name`.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub statement_timeout: Option<Duration>,
    pub lock_timeout: Duration,
    pub idle_in_transaction_timeout: Option<Duration>,
    /// `application_name`, unless the URL sets one: what `pg_stat_activity`, the server's
    /// log and the layer's own [`Holder`](crate::Holder)s name the session by.
    pub application_name: Option<String>,
    /// A transaction pooler keeps no session state ([`Options::transaction_pooling`]): the
    /// timeouts go `LOCAL` into each transaction instead (`pooler::local_settings`), and
    /// Diesel prepares no statement to keep.
    pub transaction_pooling: bool,
}

impl Settings {
    pub(crate) fn new(options: &Options, url: &str) -> Self {
        Self {
            statement_timeout: options.statement_timeout,
            lock_timeout: options.lock_timeout,
            idle_in_transaction_timeout: options.idle_in_transaction_timeout,
            application_name: (!url.to_ascii_lowercase().contains("application_name="))
                .then(program_name)
                .flatten(),
            transaction_pooling: options.transaction_pooling,
        }
    }

    /// The `SET` statements, one batch. Behind a transaction pooler only
    /// `application_name`, which PgBouncer keeps for each client and sets on whichever
    /// server connection it runs.
    pub(crate) fn sql(&self) -> String {
        let mut sql = if self.transaction_pooling {
            String::new()
        } else {
            format!(
                "SET statement_timeout = {}; SET lock_timeout = {}; \
                 SET idle_in_transaction_session_timeout = {};",
                millis(self.statement_timeout),
                millis(Some(self.lock_timeout)),
                millis(self.idle_in_transaction_timeout),
            )
        };
        if let Some(name) = &self.application_name {
            sql.push_str(&format!(" SET application_name = '{name}';"));
        }
        sql
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

/// Opens a session: connects, installs the failure recorder, applies `settings`.
pub(crate) fn connect(url: &str, settings: &Settings) -> Result<PgConnection, SessionError> {
    let mut conn = PgConnection::establish(url).map_err(SessionError::Connect)?;
    conn.set_instrumentation(Recorder::new());
    if settings.transaction_pooling {
        // A statement prepared on one server connection is missing on the next one's.
        conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Disabled);
    }
    let sql = settings.sql();
    if !sql.is_empty() {
        conn.batch_execute(&sql).map_err(SessionError::Settings)?;
    }
    Ok(conn)
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error(transparent)]
    Connect(diesel::ConnectionError),
    #[error("cannot apply the session settings")]
    Settings(#[source] diesel::result::Error),
}

/// The connection manager of a [`PgPool`]: Diesel's, except that each session starts with
/// the layer's settings and its failure recorder, and that a connection that was lost is
/// closed instead of going back to the pool (Diesel's check only looks at its transaction
/// state, which a failed `BEGIN` leaves clean).
pub struct PgManager {
    url: String,
    settings: Settings,
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
        }
    }
}

impl ManageConnection for PgManager {
    type Connection = PgConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<PgConnection, diesel::r2d2::Error> {
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
    fn timeouts_are_milliseconds_and_none_is_zero() {
        assert_eq!(millis(None), 0);
        assert_eq!(millis(Some(Duration::from_micros(10))), 1);
        assert_eq!(millis(Some(Duration::from_secs(5))), 5000);
    }
}
