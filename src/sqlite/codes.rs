//! SQLite's result codes for the statements of a closure, whatever error type it returns.
//!
//! Diesel keeps only the message of a failed statement, and "database is locked" is also
//! what a trigger's `RAISE(ABORT, 'database is locked')` says. SQLite's extended result code
//! tells them apart (`SQLITE_BUSY` against `SQLITE_CONSTRAINT_TRIGGER`). So:
//! - the customizer takes each pooled connection's handle from Diesel
//!   (`with_raw_connection`, in `sqlite::ffi`: no SQL function, no setup query that the
//!   file's contents could break), and installs a Diesel [`Instrumentation`] that, at the
//!   end of every statement, reads the connection's extended result code, while it is still
//!   the statement's (before Diesel or the caller run anything else);
//! - `write` and `read` take what it recorded when their closure fails, and retry only if
//!   the statement that failed last failed with a lock code.
//!
//! A closure may also fail on a connection other than the one it was given: another
//! `Database`'s (a second file, or a second handle), taken from its pool. Every connection
//! the layer prepared records its failures for its thread as well, so such a lock is found
//! whatever the closure's error type. On a connection the layer did not prepare (a plain
//! `SqliteConnection`), only the error value can tell: Diesel's error, this crate's, or a
//! boxed error, and their source chains ([`lock_in_value`]); an application's own type
//! (`anyhow::Error`, an enum with `#[from]`) hides it.
//!
//! Diesel's `set_default_instrumentation` keeps working (the layer's instrumentation forwards
//! every event to it). A connection whose instrumentation the application replaced has no
//! codes, and its closure's errors are classified as [`is_lock_error`](crate::is_lock_error)
//! does, by message.

use std::any::Any;
use std::error::Error as StdError;
use std::ffi::c_int;
use std::fmt;
use std::sync::Arc;

use diesel::connection::{get_default_instrumentation, Instrumentation, InstrumentationEvent};
use diesel::result::Error as DieselError;
use diesel::{Connection, SqliteConnection};
use libsqlite3_sys as ffi;

use crate::error::{is_lock_error, BoxError, Error};
use crate::sqlite::ffi::RawDb;
use crate::sqlite::guard::Assigned;
use crate::sqlite::read_age::ReadState;

/// How the statement that failed last failed, as SQLite reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SqliteFailure {
    /// The extended result code; `None` when only the message was known.
    pub code: Option<c_int>,
    pub message: String,
}

impl SqliteFailure {
    /// Whether it is one of SQLite's transient lock errors: `SQLITE_BUSY`, `SQLITE_LOCKED`,
    /// `SQLITE_PROTOCOL` or `SQLITE_SCHEMA` and their extended codes; without a code, by
    /// message.
    pub(crate) fn is_lock(&self) -> bool {
        match self.code {
            Some(code) => matches!(
                code & 0xff,
                ffi::SQLITE_BUSY | ffi::SQLITE_LOCKED | ffi::SQLITE_PROTOCOL | ffi::SQLITE_SCHEMA
            ),
            None => true,
        }
    }
}

impl fmt::Display for SqliteFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(code) = self.code {
            write!(f, " (SQLite result code {code})")?;
        }
        Ok(())
    }
}

impl StdError for SqliteFailure {}

thread_local! {
    /// The statement that failed last on this thread on any connection the layer prepared,
    /// with that connection's handle; cleared when a later statement on that connection
    /// works, and when a `write` begins its closure.
    static ON_THIS_THREAD: std::cell::RefCell<Option<(RawDb, SqliteFailure)>> =
        const { std::cell::RefCell::new(None) };
}

/// The layer's instrumentation on a pooled connection: records the result code of the
/// statement that failed last, and forwards every event to the application's default
/// instrumentation.
struct ResultCodes {
    /// The connection's own handle. Only read while the connection runs a statement, on its
    /// thread; the connection owns this value, so never after it closed.
    db: RawDb,
    failure: Option<SqliteFailure>,
    /// The connection's read state, when its reads are capped.
    read_state: Option<Arc<ReadState>>,
    /// The settings assigned on it (by its authorizer, see `guard`).
    assigned: Arc<Assigned>,
    inner: Option<Box<dyn Instrumentation>>,
}

impl Instrumentation for ResultCodes {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::FinishQuery { query, error, .. } = &event {
            let code = self.db.extended_errcode();
            match code & 0xff {
                // Diesel reports a failed step of a `load` as finished without an error; the
                // code still says so. After success the code is OK (or ROW/DONE).
                ffi::SQLITE_OK | ffi::SQLITE_ROW | ffi::SQLITE_DONE if error.is_none() => {
                    // A later statement that worked means the failure was handled, except the
                    // rollback of a nested transaction that the failure itself caused.
                    if self.failure.is_some()
                        && !crate::handle::is_savepoint_control(&query.to_string())
                    {
                        self.failure = None;
                        ON_THIS_THREAD.with_borrow_mut(|last| {
                            if last.as_ref().is_some_and(|(db, _)| *db == self.db) {
                                *last = None;
                            }
                        });
                    }
                }
                _ => {
                    let message = match error {
                        Some(DieselError::DatabaseError(_, info)) => info.message().to_owned(),
                        Some(other) => other.to_string(),
                        None => self.db.errmsg(),
                    };
                    let failure = SqliteFailure {
                        code: Some(code),
                        message,
                    };
                    ON_THIS_THREAD.with_borrow_mut(|last| {
                        *last = Some((self.db, failure.clone()));
                    });
                    self.failure = Some(failure);
                }
            }
        }
        if let Some(inner) = &mut self.inner {
            inner.on_connection_event(event);
        }
    }
}

/// What [`attach`] installs on a connection besides the result codes and the migration
/// guard.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Hooks {
    /// The layer's checkpoint hook (see `checkpoint`), warning at this WAL size.
    pub checkpoints: Option<u64>,
    /// A read state, for reads with a maximum age (see `read_age`).
    pub read_age: bool,
}

/// Installs on `conn` the recording instrumentation, the migration guard, and the `hooks`.
/// Nothing here reads the database's tables: no content of the file can keep a protection
/// off.
pub(crate) fn attach(conn: &mut SqliteConnection, hooks: Hooks) {
    if let Some(warn_bytes) = hooks.checkpoints {
        crate::sqlite::checkpoint::install(conn, warn_bytes);
    }
    let assigned = Arc::new(Assigned::default());
    // The read-age authorizer, where there is one, keeps the migration guard too.
    let read_state = hooks
        .read_age
        .then(|| ReadState::install(conn, Arc::clone(&assigned)))
        .flatten();
    if read_state.is_none() {
        crate::sqlite::guard::install(conn, Arc::clone(&assigned));
    }
    let db = RawDb::of(conn);
    conn.set_instrumentation(ResultCodes {
        db,
        failure: None,
        read_state,
        assigned,
        inner: get_default_instrumentation(),
    });
}

/// The settings assigned on `conn` since the last call (see `guard::Assigned`); 0 on a
/// connection the layer did not prepare.
pub(crate) fn take_assigned(conn: &mut SqliteConnection) -> u8 {
    conn.instrumentation()
        .downcast_mut::<ResultCodes>()
        .map_or(0, |codes| codes.assigned.take())
}

/// What `conn` recorded of the statements run since the last call.
pub(crate) enum Recorded {
    /// The layer's instrumentation is not on the connection.
    Unknown,
    /// No statement failed, or the last failure was followed by one that worked.
    Clean,
    /// The statement that failed last.
    Failed(SqliteFailure),
}

/// Whether the layer prepared `conn` (its instrumentation is on it).
pub(crate) fn is_prepared(conn: &mut SqliteConnection) -> bool {
    conn.instrumentation().is::<ResultCodes>()
}

/// The read state of `conn`, if its reads are capped.
pub(crate) fn read_state(conn: &mut SqliteConnection) -> Option<Arc<ReadState>> {
    conn.instrumentation()
        .downcast_mut::<ResultCodes>()
        .and_then(|codes| codes.read_state.clone())
}

/// Forgets the failures recorded on this thread (on any connection): a closure begins.
pub(crate) fn forget_this_threads() {
    ON_THIS_THREAD.with_borrow_mut(|last| *last = None);
}

/// Takes (and clears) what `conn` recorded.
pub(crate) fn take(conn: &mut SqliteConnection) -> Recorded {
    match conn.instrumentation().downcast_mut::<ResultCodes>() {
        None => Recorded::Unknown,
        Some(codes) => match codes.failure.take() {
            None => Recorded::Clean,
            Some(failure) => Recorded::Failed(failure),
        },
    }
}

/// The lock error a closure failed with, if it failed with one: from the result code of the
/// statement that failed last, unhandled, on any connection the layer prepared that this
/// thread used since the closure began (see [`forget_this_threads`]), the one it was given
/// or another; else from the error value itself (Diesel's error, the layer's, or a boxed
/// error's source chain, by message).
pub(crate) fn lock_failure<E: 'static>(recorded: Recorded, error: &E) -> Option<SqliteFailure> {
    let last = ON_THIS_THREAD
        .with_borrow_mut(Option::take)
        .map(|(_, failure)| failure);
    match (last, recorded) {
        (Some(failure), _) | (None, Recorded::Failed(failure)) => {
            failure.is_lock().then_some(failure)
        }
        (None, Recorded::Clean | Recorded::Unknown) => lock_in_value(error),
    }
}

/// The lock error in `error`, found by downcasting it to the error types the layer knows.
pub(crate) fn lock_in_value<E: 'static>(error: &E) -> Option<SqliteFailure> {
    let any = error as &dyn Any;
    let chain: &(dyn StdError + 'static) = if let Some(diesel) = any.downcast_ref::<DieselError>() {
        diesel
    } else if let Some(ours) = any.downcast_ref::<Error>() {
        ours
    } else if let Some(boxed) = any.downcast_ref::<BoxError>() {
        &**boxed
    } else if let Some(boxed) = any.downcast_ref::<Box<dyn StdError + Send>>() {
        &**boxed
    } else if let Some(boxed) = any.downcast_ref::<Box<dyn StdError>>() {
        &**boxed
    } else {
        return None;
    };
    lock_in_chain(chain)
}

/// The first lock error in `error`'s source chain, as Diesel's error or the layer's.
pub(crate) fn lock_in_chain(error: &(dyn StdError + 'static)) -> Option<SqliteFailure> {
    let mut current = Some(error);
    while let Some(e) = current {
        let lock = if let Some(diesel) = e.downcast_ref::<DieselError>() {
            Some(is_lock_error(diesel))
        } else {
            e.downcast_ref::<Error>().map(Error::is_lock_error)
        };
        match lock {
            Some(true) => {
                return Some(SqliteFailure {
                    code: None,
                    message: crate::error::error_chain(e),
                })
            }
            Some(false) => return None,
            None => current = e.source(),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::connection::SimpleConnection;
    use diesel::RunQueryDsl;

    fn recording() -> SqliteConnection {
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        attach(&mut conn, Hooks::default());
        conn.batch_execute(
            "CREATE TABLE t (x INTEGER); \
             CREATE TRIGGER fake BEFORE INSERT ON t WHEN NEW.x < 0 \
             BEGIN SELECT RAISE(ABORT, 'database is locked'); END;",
        )
        .unwrap();
        conn
    }

    fn failed(recorded: Recorded) -> SqliteFailure {
        match recorded {
            Recorded::Failed(failure) => failure,
            Recorded::Unknown => panic!("no codes on the connection"),
            Recorded::Clean => panic!("nothing recorded"),
        }
    }

    #[test]
    fn a_trigger_saying_database_is_locked_is_not_a_lock() {
        let mut conn = recording();
        let error = diesel::sql_query("INSERT INTO t VALUES (-1)")
            .execute(&mut conn)
            .unwrap_err();
        // By message, the classifier cannot tell.
        assert!(is_lock_error(&error), "{error}");
        let failure = failed(take(&mut conn));
        assert_eq!(failure.code, Some(ffi::SQLITE_CONSTRAINT_TRIGGER));
        assert_eq!(failure.message, "database is locked");
        assert!(!failure.is_lock());
        assert!(matches!(take(&mut conn), Recorded::Clean));
    }

    #[test]
    fn a_failed_load_is_recorded_though_diesel_reports_it_without_an_error() {
        use diesel::dsl::sql;
        use diesel::sql_types::BigInt;
        let mut conn = recording();
        // A failure while preparing.
        let error = diesel::select(sql::<BigInt>("(SELECT x FROM missing)"))
            .load::<i64>(&mut conn)
            .unwrap_err();
        let failure = failed(take(&mut conn));
        assert_eq!(failure.code, Some(ffi::SQLITE_ERROR));
        assert!(error.to_string().contains("missing"), "{error}");
        // A failure while stepping, which Diesel's event reports as no error.
        diesel::select(sql::<BigInt>("abs(-9223372036854775807 - 1)"))
            .load::<i64>(&mut conn)
            .unwrap_err();
        let failure = failed(take(&mut conn));
        assert!(failure.message.contains("overflow"), "{failure}");
    }

    #[test]
    fn a_handled_failure_is_cleared_by_the_next_statement_but_not_by_a_rollback() {
        let mut conn = recording();
        let insert_fake = |conn: &mut SqliteConnection| {
            diesel::sql_query("INSERT INTO t VALUES (-1)")
                .execute(conn)
                .unwrap_err()
        };
        insert_fake(&mut conn);
        diesel::sql_query("INSERT INTO t VALUES (1)")
            .execute(&mut conn)
            .unwrap();
        assert!(matches!(take(&mut conn), Recorded::Clean));
        // Diesel's nested transaction rolls back to its savepoint after the failure.
        let result = conn.transaction(|conn| -> diesel::QueryResult<()> {
            conn.transaction(|conn| {
                insert_fake(conn);
                Err(DieselError::RollbackTransaction)
            })
        });
        assert!(result.is_err());
        assert_eq!(
            failed(take(&mut conn)).code,
            Some(ffi::SQLITE_CONSTRAINT_TRIGGER)
        );
    }

    #[test]
    fn the_default_instrumentation_still_sees_every_event() {
        use std::cell::Cell;
        thread_local! {
            // Per thread: other tests' connections, opened meanwhile, count on theirs.
            static SEEN: Cell<usize> = const { Cell::new(0) };
        }
        struct Count;
        impl Instrumentation for Count {
            fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
                if matches!(event, InstrumentationEvent::FinishQuery { .. }) {
                    SEEN.with(|seen| seen.set(seen.get() + 1));
                }
            }
        }
        // Only this test sets a default.
        diesel::connection::set_default_instrumentation(|| Some(Box::new(Count))).unwrap();
        let mut conn = recording();
        diesel::connection::set_default_instrumentation(|| None).unwrap();
        let before = SEEN.with(Cell::get);
        conn.batch_execute("SELECT 1").unwrap();
        assert_eq!(SEEN.with(Cell::get), before + 1);
    }

    #[test]
    fn without_codes_the_error_value_decides() {
        let locked = DieselError::DatabaseError(
            diesel::result::DatabaseErrorKind::Unknown,
            Box::new("database is locked".to_owned()),
        );
        assert!(lock_failure(Recorded::Unknown, &locked).is_some());
        let boxed: Box<dyn StdError> = Box::new(locked);
        assert!(lock_failure(Recorded::Clean, &boxed).is_some());
        assert!(lock_failure(Recorded::Clean, &DieselError::NotFound).is_none());
        // A type the layer cannot look into.
        assert!(lock_failure(Recorded::Unknown, &"database is locked").is_none());
        // A recorded code wins over the message.
        let trigger = SqliteFailure {
            code: Some(ffi::SQLITE_CONSTRAINT_TRIGGER),
            message: "database is locked".into(),
        };
        assert!(lock_failure(Recorded::Failed(trigger), &boxed).is_none());
    }
}
