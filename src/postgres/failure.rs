//! Which PostgreSQL failures go away by running the whole transaction again, and the
//! instrumentation that records them whatever error type a closure returns.
//!
//! Failures are told by their SQLSTATE, which Diesel 2.4 exposes
//! (`DatabaseErrorInformation::sqlstate`): never by the server's message, which is in the
//! language of the server's `lc_messages`. Only errors that carry no SQLSTATE (libpq's own,
//! for a connection it lost) fall back to Diesel's `ClosedConnection` and libpq's English
//! messages.

use std::any::Any;
use std::error::Error as StdError;
use std::fmt;

use diesel::connection::{Instrumentation, InstrumentationEvent};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::PgConnection;

use crate::error::{BoxError, Error};

/// Which failure a [`PgFailure`] was: one that running the transaction again can cure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PgFailureKind {
    /// 40001 `serialization_failure`: a `SERIALIZABLE` transaction met a concurrent one.
    Serialization,
    /// 40P01 `deadlock_detected`: the server cancelled this transaction to break a cycle.
    Deadlock,
    /// 55P03 `lock_not_available`: a lock wait passed `lock_timeout`.
    LockTimeout,
    /// The connection was lost (before `COMMIT` was sent, where this is retried).
    ConnectionLost,
}

impl PgFailureKind {
    /// What a retry of it waits for.
    pub(crate) fn waiting(self) -> crate::retry::Waiting {
        match self {
            PgFailureKind::ConnectionLost => crate::retry::Waiting::Unavailable,
            PgFailureKind::Serialization | PgFailureKind::Deadlock => {
                crate::retry::Waiting::Conflict
            }
            PgFailureKind::LockTimeout => crate::retry::Waiting::Locked,
        }
    }

    /// What it is, as errors and `tracing` events say it.
    pub fn as_str(self) -> &'static str {
        match self {
            PgFailureKind::Serialization => "serialization failure",
            PgFailureKind::Deadlock => "deadlock",
            PgFailureKind::LockTimeout => "lock timeout",
            PgFailureKind::ConnectionLost => "connection lost",
        }
    }
}

/// A failed statement that running the transaction again can cure, with the server's message:
/// what [`Error::Busy`](crate::Error::Busy) carries as its source when a PostgreSQL
/// operation gave up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgFailure {
    pub(crate) kind: PgFailureKind,
    pub(crate) message: String,
}

impl PgFailure {
    /// Which failure it was.
    pub fn kind(&self) -> PgFailureKind {
        self.kind
    }

    /// The server's (or libpq's) message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for PgFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl StdError for PgFailure {}

/// 25P02 (`in_failed_sql_transaction`): every statement after a failed one in the same
/// transaction. It says nothing about why the transaction failed.
const IN_FAILED_TRANSACTION: &str = "25P02";

/// Whether `error` is one running the transaction again can cure, and which.
pub(crate) fn transient(error: &DieselError) -> Option<PgFailureKind> {
    match error {
        DieselError::DatabaseError(kind, info) => match info.sqlstate() {
            Some(state) => by_sqlstate(state.as_str()),
            // libpq's own errors carry no SQLSTATE: a connection it lost.
            None if *kind == DatabaseErrorKind::ClosedConnection => {
                Some(PgFailureKind::ConnectionLost)
            }
            None => by_libpq_message(info.message()),
        },
        DieselError::RollbackErrorOnCommit { commit_error, .. } => transient(commit_error),
        // Diesel's transaction manager gave up on the session: its connection went bad
        // (libpq's status unknown) or a rollback failed. Nothing more is sent on it (not a
        // `COMMIT` either); a fresh session runs the transaction again.
        DieselError::BrokenTransactionManager => Some(PgFailureKind::ConnectionLost),
        _ => None,
    }
}

/// The transient failures, by SQLSTATE: 40001, 40P01, 55P03, and a session the server ended
/// or lost (class 08, connection exception; 57P01-57P03, an administrator's or a crash's
/// shutdown, or a server not yet accepting connections).
fn by_sqlstate(state: &str) -> Option<PgFailureKind> {
    match state {
        "40001" => Some(PgFailureKind::Serialization),
        "40P01" => Some(PgFailureKind::Deadlock),
        "55P03" => Some(PgFailureKind::LockTimeout),
        "57P01" | "57P02" | "57P03" => Some(PgFailureKind::ConnectionLost),
        _ if state.starts_with("08") => Some(PgFailureKind::ConnectionLost),
        _ => None,
    }
}

/// A lost connection, by libpq's own message, for an error without a SQLSTATE that Diesel
/// did not mark `ClosedConnection`.
fn by_libpq_message(message: &str) -> Option<PgFailureKind> {
    (message.starts_with("server closed the connection unexpectedly")
        || message.starts_with("no connection to the server"))
    .then_some(PgFailureKind::ConnectionLost)
}

/// The transient failure in `error`, as a [`PgFailure`].
pub(crate) fn failure(error: &DieselError) -> Option<PgFailure> {
    let kind = transient(error)?;
    let message = match error {
        DieselError::DatabaseError(_, info) => info.message().to_owned(),
        DieselError::RollbackErrorOnCommit { commit_error, .. } => commit_error.to_string(),
        other => other.to_string(),
    };
    Some(PgFailure { kind, message })
}

/// The instrumentation on every pooled PostgreSQL connection: records the statement that
/// failed last (a failure inside an already failed transaction says nothing new and is
/// skipped), and whether the connection was lost, then forwards every event.
pub(crate) struct Recorder {
    /// The last failed statement: `Some(None)` if it was not transient.
    last: Option<Option<PgFailure>>,
    /// The connection was lost: the pool must not hand it out again.
    pub(crate) lost: bool,
    /// Which server the session runs on, for asking about a lost `COMMIT`.
    pub(crate) server: Option<super::outcome::Identity>,
    inner: Option<Box<dyn Instrumentation>>,
}

impl Recorder {
    pub(crate) fn new() -> Self {
        Self {
            last: None,
            lost: false,
            server: None,
            inner: diesel::connection::get_default_instrumentation(),
        }
    }
}

impl Instrumentation for Recorder {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::FinishQuery { query, error, .. } = &event {
            match error {
                Some(DieselError::DatabaseError(_, info))
                    if info
                        .sqlstate()
                        .is_some_and(|s| s.as_str() == IN_FAILED_TRANSACTION) => {}
                Some(error) => {
                    let failure = failure(error);
                    if matches!(&failure, Some(f) if f.kind == PgFailureKind::ConnectionLost) {
                        self.lost = true;
                    }
                    self.last = Some(failure);
                }
                // A later statement that worked means the failure was handled, except the
                // rollback of a savepoint that the failure itself caused.
                None if !crate::handle::is_savepoint_control(&query.to_string()) => {
                    self.last = None
                }
                None => {}
            }
        }
        if let Some(inner) = &mut self.inner {
            inner.on_connection_event(event);
        }
    }
}

/// What `conn`'s recorder holds of the statements since the last call, cleared.
pub(crate) enum Recorded {
    /// The layer's recorder is not on the connection (the application replaced it).
    Unknown,
    /// No statement failed, or the last failure was handled.
    Clean,
    /// The statement that failed last: transient or not.
    Failed(Option<PgFailure>),
}

/// Takes what `conn` recorded.
pub(crate) fn take(conn: &mut PgConnection) -> Recorded {
    use diesel::Connection;
    match conn.instrumentation().downcast_mut::<Recorder>() {
        None => Recorded::Unknown,
        Some(recorder) => match recorder.last.take() {
            None => Recorded::Clean,
            Some(failure) => Recorded::Failed(failure),
        },
    }
}

/// Whether `conn` was lost.
pub(crate) fn lost(conn: &mut PgConnection) -> bool {
    use diesel::Connection;
    conn.instrumentation()
        .downcast_mut::<Recorder>()
        .is_some_and(|recorder| recorder.lost)
}

/// The server identity recorded when `conn` opened, if any.
pub(crate) fn server(conn: &mut PgConnection) -> Option<super::outcome::Identity> {
    use diesel::Connection;
    conn.instrumentation()
        .downcast_mut::<Recorder>()
        .and_then(|recorder| recorder.server.clone())
}

/// Records which server `conn` runs on.
pub(crate) fn set_server(conn: &mut PgConnection, server: Option<super::outcome::Identity>) {
    use diesel::Connection;
    if let Some(recorder) = conn.instrumentation().downcast_mut::<Recorder>() {
        recorder.server = server;
    }
}

/// Marks `conn` as not to be handed out again.
pub(crate) fn discard(conn: &mut PgConnection) {
    use diesel::Connection;
    if let Some(recorder) = conn.instrumentation().downcast_mut::<Recorder>() {
        recorder.lost = true;
    }
}

/// The transient failure a closure failed with, if any: from the statement that failed last
/// on its connection when one was recorded, else from the error value itself (Diesel's error,
/// the layer's, or a boxed error's source chain).
pub(crate) fn closure_failure<E: 'static>(recorded: Recorded, error: &E) -> Option<PgFailure> {
    match recorded {
        Recorded::Failed(failure) => failure,
        Recorded::Clean | Recorded::Unknown => in_value(error),
    }
}

/// The transient failure in `error`, found by downcasting it to the error types the layer
/// knows and walking their source chain.
fn in_value<E: 'static>(error: &E) -> Option<PgFailure> {
    let any = error as &dyn Any;
    let mut current: Option<&(dyn StdError + 'static)> =
        if let Some(diesel) = any.downcast_ref::<DieselError>() {
            Some(diesel)
        } else if let Some(ours) = any.downcast_ref::<Error>() {
            Some(ours)
        } else if let Some(boxed) = any.downcast_ref::<BoxError>() {
            Some(&**boxed)
        } else if let Some(boxed) = any.downcast_ref::<Box<dyn StdError + Send>>() {
            Some(&**boxed)
        } else if let Some(boxed) = any.downcast_ref::<Box<dyn StdError>>() {
            Some(&**boxed)
        } else {
            None
        };
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<DieselError>().and_then(failure) {
            return Some(found);
        }
        if let Some(found) = e.downcast_ref::<PgFailure>() {
            return Some(found.clone());
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_are_told_by_sqlstate_in_any_language() {
        for (state, kind) in [
            ("40001", Some(PgFailureKind::Serialization)),
            ("40P01", Some(PgFailureKind::Deadlock)),
            ("55P03", Some(PgFailureKind::LockTimeout)),
            ("57P01", Some(PgFailureKind::ConnectionLost)),
            ("08006", Some(PgFailureKind::ConnectionLost)),
            // A statement timeout is the application's limit: never retried.
            ("57014", None),
            ("23505", None),
            ("25P02", None),
        ] {
            assert_eq!(by_sqlstate(state), kind, "{state}");
        }
        assert_eq!(
            by_libpq_message("server closed the connection unexpectedly\n"),
            Some(PgFailureKind::ConnectionLost)
        );
        // A server's message in another language says nothing without its SQLSTATE.
        assert_eq!(
            by_libpq_message("storniere Anfrage wegen Zeitüberschreitung einer Sperre"),
            None
        );
    }
}
