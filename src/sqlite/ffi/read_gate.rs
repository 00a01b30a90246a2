//! Ending a read transaction from another thread, for the read-age cap (see `read_age`,
//! which owns the watchdog and the policy; this is the part that calls SQLite).
//!
//! The watchdog ends a read that outlived its limit while the closure still holds the
//! connection:
//! 1. it marks the read expired, under the lock the read's owner takes to end it, so the
//!    connection is neither returned to the pool nor closed meanwhile;
//! 2. `sqlite3_interrupt` stops a statement that is running;
//! 3. setting the authorizer again expires every prepared statement, so each later
//!    statement of the closure is prepared again and refused by the authorizer ("not
//!    authorized"): the closure can never read on outside its snapshot without noticing.
//!    Diesel's `on_authorize` takes the connection itself, which the closure holds, so the
//!    authorizer is SQLite's own, set on the handle;
//! 4. `ROLLBACK` ends the transaction, and the WAL can be checkpointed.
//!
//! SQLite serializes calls on one handle, so these calls from the watchdog's thread are
//! safe beside the closure's.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use diesel::SqliteConnection;
use libsqlite3_sys as ffi;

use super::RawDb;
use crate::sqlite::guard::Assigned;

/// One connection's read state, shared by its owner, the watchdog and SQLite (as the
/// authorizer's data, alive until the connection closes).
#[derive(Debug)]
pub(crate) struct ReadState {
    /// The connection's handle; used by the watchdog only while a read is active, which
    /// keeps the connection open.
    db: RawDb,
    /// Set when the watchdog ended the read; the authorizer then refuses all but
    /// transaction statements.
    expired: AtomicBool,
    /// The active read's deadline; `None` between reads and once the watchdog ended it.
    active: Mutex<Option<Instant>>,
    /// The settings assigned on the connection (see `guard`).
    assigned: Arc<Assigned>,
}

/// An argument of the authorizer as text; `None` for a null pointer or one not UTF-8.
///
/// # Safety
/// `arg` is null or a NUL-terminated string alive for the call.
unsafe fn text<'a>(arg: *const c_char) -> Option<&'a str> {
    // SAFETY: as the caller promises.
    (!arg.is_null())
        .then(|| unsafe { CStr::from_ptr(arg) }.to_str().ok())
        .flatten()
}

unsafe extern "C" fn authorize(
    data: *mut c_void,
    action: c_int,
    arg1: *const c_char,
    arg2: *const c_char,
    _database: *const c_char,
    _trigger: *const c_char,
) -> c_int {
    // SAFETY: `data` is the connection's `ReadState`, alive until it closes.
    let state = unsafe { &*(data as *const ReadState) };
    let transaction = action == ffi::SQLITE_TRANSACTION;
    if state.expired.load(Ordering::Acquire) {
        // Only the end of the transaction the watchdog rolled back: a `BEGIN` (or a
        // savepoint, which begins one outside a transaction) would start a read after the
        // cap.
        // SAFETY: SQLite passes the operation's name, alive for the call.
        let operation = unsafe { text(arg1) };
        if !transaction || operation.is_none_or(|op| op.eq_ignore_ascii_case("BEGIN")) {
            return ffi::SQLITE_DENY;
        }
    }
    if action == ffi::SQLITE_PRAGMA {
        // SAFETY: SQLite passes the pragma's name and argument (or null), alive for the call.
        if unsafe { state.assigned.note(text(arg1), text(arg2)) } {
            return ffi::SQLITE_DENY;
        }
    }
    if matches!(
        action,
        ffi::SQLITE_CREATE_TEMP_TABLE
            | ffi::SQLITE_CREATE_TEMP_INDEX
            | ffi::SQLITE_CREATE_TEMP_TRIGGER
            | ffi::SQLITE_CREATE_TEMP_VIEW
            | ffi::SQLITE_ATTACH
    ) {
        state.assigned.note_schema_change();
    }
    // The migration guard, which this authorizer replaces on the connection.
    if transaction && crate::sqlite::guard::denies_transaction() {
        return ffi::SQLITE_DENY;
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn release(data: *mut c_void) {
    // SAFETY: the reference `install` gave SQLite, released once, when SQLite destroys the
    // function at close (or at once if registering failed).
    drop(unsafe { Arc::from_raw(data as *const ReadState) });
}

impl ReadState {
    /// Gives `conn` a read state and the authorizer that enforces it (and the migration
    /// guard); `None` if SQLite would not take it (the connection then has no cap).
    pub(crate) fn install(
        conn: &mut SqliteConnection,
        assigned: Arc<Assigned>,
    ) -> Option<Arc<ReadState>> {
        let db = RawDb::of(conn);
        let state = Arc::new(ReadState {
            db,
            expired: AtomicBool::new(false),
            active: Mutex::new(None),
            assigned,
        });
        let shared = Arc::into_raw(Arc::clone(&state)) as *mut c_void;
        // SAFETY: `db` is `conn`'s, open, used on this thread; SQLite owns `shared` from
        // here and releases it at close (or at once if registering fails), after the last
        // authorizer call.
        unsafe {
            if !super::owned::until_close(
                db.as_ptr(),
                c"sqlite_persistence_read_state",
                shared,
                release,
            ) {
                return None;
            }
            ffi::sqlite3_set_authorizer(db.as_ptr(), Some(authorize), shared);
        }
        Some(state)
    }

    /// The active read's deadline, locked: while it is `Some`, the owner holds the
    /// connection open.
    pub(crate) fn active(&self) -> MutexGuard<'_, Option<Instant>> {
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a read to be ended at `deadline`.
    pub(crate) fn begin(&self, deadline: Instant) {
        self.expired.store(false, Ordering::Release);
        *self.active() = Some(deadline);
    }

    /// Ends watching the read; returns whether the watchdog ended it. The connection takes
    /// statements again afterwards.
    pub(crate) fn finish(&self) -> bool {
        let mut active = self.active();
        *active = None;
        self.expired.swap(false, Ordering::AcqRel)
    }

    /// Ends the read on the watchdog's behalf, if it is still active; `active` is this
    /// state's lock, held, so the owner cannot end the read (and give the connection back)
    /// meanwhile.
    pub(crate) fn expire(&self, active: &mut Option<Instant>) {
        if active.take().is_none() {
            return;
        }
        self.expired.store(true, Ordering::Release);
        let db = self.db.as_ptr();
        let authorizer = self as *const ReadState as *mut c_void;
        // SAFETY: the read was active, so its owner holds the connection and it is open, and
        // cannot end the read before `active`'s lock is released; SQLite serializes these
        // calls with the owner's. The authorizer's data is this state, which SQLite holds a
        // reference to until the connection closes.
        unsafe {
            ffi::sqlite3_interrupt(db);
            ffi::sqlite3_set_authorizer(db, Some(authorize), authorizer);
            ffi::sqlite3_exec(
                db,
                c"ROLLBACK".as_ptr(),
                None,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
        }
    }
}
