//! A migration may not end the batch's transaction: `BEGIN`, `COMMIT`, `END` or `ROLLBACK`
//! in its SQL would commit (or drop) part of the batch, leaving it applied and recorded while
//! the rest fails.
//!
//! Reading the SQL text cannot tell a `COMMIT` from the `END` of a trigger body; SQLite's
//! parser can. The connections the layer migrates on get an authorizer, which SQLite asks
//! about every statement it prepares: while this thread runs a migration's SQL, it denies the
//! transaction statements (savepoints, which Diesel nests migrations in, stay allowed).
//! Diesel does not hand out the `sqlite3` handle the authorizer is set on, so it is set by
//! SQLite's auto-extension hook, registered only while the layer opens its own connection.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Mutex, PoisonError};

use libsqlite3_sys as ffi;

thread_local! {
    /// Whether this thread is running a migration's SQL.
    static MIGRATING: Cell<bool> = const { Cell::new(false) };
    /// Whether a transaction statement was denied since the migration began.
    static DENIED: Cell<bool> = const { Cell::new(false) };
}

unsafe extern "C" fn authorize(
    _data: *mut c_void,
    action: c_int,
    _arg1: *const c_char,
    _arg2: *const c_char,
    _database: *const c_char,
    _trigger: *const c_char,
) -> c_int {
    during_migration(action)
}

/// The guard's answer for `action`: `SQLITE_DENY` for a transaction statement while this
/// thread runs a migration, else `SQLITE_OK`. For another authorizer that replaces this one
/// on a connection and must keep the guard.
pub(crate) fn during_migration(action: c_int) -> c_int {
    if action == ffi::SQLITE_TRANSACTION && MIGRATING.with(Cell::get) {
        DENIED.with(|denied| denied.set(true));
        ffi::SQLITE_DENY
    } else {
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn install(
    db: *mut ffi::sqlite3,
    _error: *mut *mut c_char,
    _api: *const ffi::sqlite3_api_routines,
) -> c_int {
    // SAFETY: SQLite calls this with the handle of the connection it is opening.
    unsafe { ffi::sqlite3_set_authorizer(db, Some(authorize), std::ptr::null_mut()) };
    ffi::SQLITE_OK
}

/// Runs `open`, in which the layer opens the connection it will migrate on, with the guard
/// installed on every connection opened meanwhile (another thread's too: harmless, as the
/// guard only acts on a thread that runs a migration).
pub(crate) fn guarded<T>(open: impl FnOnce() -> T) -> T {
    // One registration at a time: another open's cancel must not end this one's window.
    static WINDOW: Mutex<()> = Mutex::new(());
    let _window = WINDOW.lock().unwrap_or_else(PoisonError::into_inner);
    // SAFETY: `install` has the signature SQLite calls auto-extensions with.
    unsafe { ffi::sqlite3_auto_extension(Some(install)) };
    struct Cancel;
    impl Drop for Cancel {
        fn drop(&mut self) {
            // SAFETY: as above; cancelling an entry point that is registered.
            unsafe { ffi::sqlite3_cancel_auto_extension(Some(install)) };
        }
    }
    let _cancel = Cancel;
    open()
}

/// Runs `f` (one migration) with transaction statements denied on this thread's guarded
/// connections; returns its result and whether a transaction statement was denied.
pub(crate) fn migrating<T>(f: impl FnOnce() -> T) -> (T, bool) {
    struct Done;
    impl Drop for Done {
        fn drop(&mut self) {
            MIGRATING.with(|migrating| migrating.set(false));
        }
    }
    DENIED.with(|denied| denied.set(false));
    MIGRATING.with(|migrating| migrating.set(true));
    let done = Done;
    let value = f();
    drop(done);
    (value, DENIED.with(Cell::get))
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::connection::SimpleConnection;
    use diesel::{Connection, SqliteConnection};

    #[test]
    fn transaction_statements_are_denied_only_while_migrating_on_a_guarded_connection() {
        let mut guarded_conn = guarded(|| SqliteConnection::establish(":memory:")).unwrap();
        let mut plain = SqliteConnection::establish(":memory:").unwrap();
        for conn in [&mut guarded_conn, &mut plain] {
            conn.batch_execute("BEGIN; CREATE TABLE t (x INTEGER); COMMIT;")
                .unwrap();
        }
        let (result, denied) =
            migrating(|| guarded_conn.batch_execute("CREATE TABLE u (x INTEGER); COMMIT;"));
        assert!(result.is_err() && denied);
        // Savepoints, and a trigger's BEGIN ... END, are not transaction statements.
        let (result, denied) = migrating(|| {
            guarded_conn.batch_execute(
                "SAVEPOINT s; CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END; \
                 RELEASE s;",
            )
        });
        assert!(result.is_ok() && !denied, "{result:?}");
        // A connection the layer did not open is never guarded.
        let (result, denied) = migrating(|| plain.batch_execute("BEGIN; COMMIT;"));
        assert!(result.is_ok() && !denied);
        // Outside a migration the guarded connection works as any.
        guarded_conn.batch_execute("BEGIN; COMMIT;").unwrap();
    }
}
