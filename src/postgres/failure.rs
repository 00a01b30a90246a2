//! Which PostgreSQL failures go away by running the whole transaction again, and the
//! instrumentation that records them whatever error type a closure returns.
//!
//! Diesel 2.3 maps SQLSTATE 40001 to `SerializationFailure` and a lost connection to
//! `ClosedConnection`, but a deadlock (40P01) and a lock timeout (55P03) are `Unknown` with
//! the server's message, and the SQLSTATE itself is not exposed. Those two are told by their
//! message, which the layer can rely on because it makes sure at open that the server
//! speaks English to its sessions (see `session`).

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

/// The server's message of 25P02 (`in_failed_sql_transaction`): every statement after a
/// failed one in the same transaction. It says nothing about why the transaction failed.
const IN_FAILED_TRANSACTION: &str =
    "current transaction is aborted, commands ignored until end of transaction block";

/// Whether `error` is one running the transaction again can cure, and which.
pub(crate) fn transient(error: &DieselError) -> Option<PgFailureKind> {
    match error {
        DieselError::DatabaseError(kind, info) => match kind {
            DatabaseErrorKind::SerializationFailure => Some(PgFailureKind::Serialization),
            DatabaseErrorKind::ClosedConnection => Some(PgFailureKind::ConnectionLost),
            _ => by_message(info.message()),
        },
        DieselError::RollbackErrorOnCommit { commit_error, .. } => transient(commit_error),
        _ => None,
    }
}

/// 40P01 and 55P03, by the server's (English) message.
fn by_message(message: &str) -> Option<PgFailureKind> {
    if message == "deadlock detected" {
        Some(PgFailureKind::Deadlock)
    } else if message == "canceling statement due to lock timeout"
        || message.starts_with("could not obtain lock on ")
    {
        Some(PgFailureKind::LockTimeout)
    } else if message.starts_with("server closed the connection unexpectedly")
        || message.starts_with("no connection to the server")
        || message.starts_with("terminating connection due to ")
    {
        Some(PgFailureKind::ConnectionLost)
    } else {
        None
    }
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
    inner: Option<Box<dyn Instrumentation>>,
}

impl Recorder {
    pub(crate) fn new() -> Self {
        Self {
            last: None,
            lost: false,
            inner: diesel::connection::get_default_instrumentation(),
        }
    }
}

impl Instrumentation for Recorder {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::FinishQuery { query, error, .. } = &event {
            match error {
                Some(DieselError::DatabaseError(_, info))
                    if info.message() == IN_FAILED_TRANSACTION => {}
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
    fn deadlocks_lock_timeouts_and_lost_connections_are_told_by_message() {
        assert_eq!(
            by_message("deadlock detected"),
            Some(PgFailureKind::Deadlock)
        );
        assert_eq!(
            by_message("canceling statement due to lock timeout"),
            Some(PgFailureKind::LockTimeout)
        );
        assert_eq!(
            by_message("could not obtain lock on row in relation \"jobs\""),
            Some(PgFailureKind::LockTimeout)
        );
        assert_eq!(
            by_message("terminating connection due to administrator command"),
            Some(PgFailureKind::ConnectionLost)
        );
        // A statement timeout is the application's limit: never retried.
        assert_eq!(
            by_message("canceling statement due to statement timeout"),
            None
        );
        assert_eq!(
            by_message("duplicate key value violates unique constraint \"t_pkey\""),
            None
        );
    }
}
