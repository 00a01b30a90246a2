//! The only code of the crate that may be `unsafe` (the crate root denies it elsewhere):
//! what Diesel 2.4 does not offer safely, reached through the handle Diesel hands out
//! (`SqliteConnection::with_raw_connection`), and the platform's calls.
//!
//! - [`RawDb`]: a connection's `sqlite3` handle, for SQLite's extended result code and
//!   message of the statement that failed last (Diesel keeps only the message);
//! - [`shm`]: the WAL index (`-shm`) read through SQLite's own mapping of it;
//! - [`page`]: a page of a file mapped shared between processes, and futexes on it;
//! - [`owned`]: data a connection's raw hooks use, freed by SQLite when it closes;
//! - [`lend`]: a connection lent to other threads, one at a time (group commit);
//! - [`read_gate`]: ending a read transaction from another thread (the read-age cap);
//! - [`sys`]: `statfs`, `faccessat`, `geteuid`, `kill`, `clock_gettime` (Unix).
//!
//! Every `unsafe` block says why it is sound (`SAFETY:`).

pub(crate) mod lend;
pub(crate) mod owned;
pub(crate) mod page;
pub(crate) mod read_gate;
pub(crate) mod shm;
pub(crate) mod sys;

use std::ffi::{c_int, CStr};
use std::path::PathBuf;
use std::ptr::NonNull;

use diesel::SqliteConnection;
use libsqlite3_sys as sqlite3;

/// A connection's `sqlite3` handle.
///
/// Made only from a `SqliteConnection` ([`RawDb::of`]), and only kept where the connection
/// owns it or outlives its use: in the connection's own instrumentation or hook data (which
/// the connection drops or SQLite frees at close), or by a read the connection's owner keeps
/// open while the handle is used ([`read_gate`]). Its methods are then calls on an open
/// connection, which SQLite serializes (the bundled library is built thread-safe and Diesel
/// opens connections without `SQLITE_OPEN_NOMUTEX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawDb(NonNull<sqlite3::sqlite3>);

// SAFETY: a `sqlite3` handle may be used from any thread in SQLite's serialized threading
// mode (see above); `RawDb` is only a pointer to it.
unsafe impl Send for RawDb {}
// SAFETY: as for `Send`: SQLite serializes calls on one handle.
unsafe impl Sync for RawDb {}

impl RawDb {
    /// The handle of `conn`.
    pub(crate) fn of(conn: &mut SqliteConnection) -> RawDb {
        // SAFETY: the closure only copies the pointer: it neither closes the handle nor
        // touches Diesel's state (transactions, cached statements). Diesel's handle is never
        // null while the connection exists.
        let raw = unsafe { conn.with_raw_connection(|db| db) };
        RawDb(NonNull::new(raw).expect("Diesel's SQLite connection has a handle"))
    }

    /// The pointer, for the calls of this room only.
    fn as_ptr(self) -> *mut sqlite3::sqlite3 {
        self.0.as_ptr()
    }

    /// The extended result code of the connection's most recent call (`sqlite3_extended_errcode`).
    pub(crate) fn extended_errcode(self) -> c_int {
        // SAFETY: the handle is open (see the type's docs); reading the code changes nothing.
        unsafe { sqlite3::sqlite3_extended_errcode(self.as_ptr()) }
    }

    /// The message of the connection's most recent failed call, copied.
    pub(crate) fn errmsg(self) -> String {
        // SAFETY: the handle is open; SQLite owns the returned string until the next call on
        // the connection, and it is copied at once.
        unsafe { CStr::from_ptr(sqlite3::sqlite3_errmsg(self.as_ptr())) }
            .to_string_lossy()
            .into_owned()
    }

    /// The file of the connection's main database; `None` for a temporary or in-memory one.
    pub(crate) fn main_file(self) -> Option<PathBuf> {
        // SAFETY: the handle is open; the string, owned by SQLite while the database is
        // attached, is copied at once. A null or empty name is an in-memory database.
        let name = unsafe { sqlite3::sqlite3_db_filename(self.as_ptr(), c"main".as_ptr()) };
        if name.is_null() {
            return None;
        }
        // SAFETY: not null, NUL-terminated (above).
        let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
        (!name.is_empty()).then(|| PathBuf::from(name.into_owned()))
    }
}
