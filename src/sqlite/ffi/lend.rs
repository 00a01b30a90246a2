//! Lending a connection to other threads for a moment: group commit runs each member's
//! closure on the member's own thread (its closure need not be `Send`), on the leader's
//! connection, one at a time, while the leader waits.
//!
//! [`lend`] takes the leader's `&mut SqliteConnection` for as long as it runs, so the leader
//! cannot touch it meanwhile; a [`Lent`] (`Send`, `'static`) reaches it only under a mutex,
//! and only while `lend` runs: before `lend` returns (unwinding too) it takes the mutex,
//! waiting for a borrower that is using the connection, and forgets the pointer.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use diesel::SqliteConnection;

/// The pointer to a lent connection.
struct Pointer(NonNull<SqliteConnection>);

// SAFETY: `SqliteConnection` is `Send` (Diesel implements it: a connection may move to
// another thread), and the pointer is only dereferenced under `Lent`'s mutex while `lend`
// holds the exclusive borrow it was made from (see the module's docs): one thread at a time
// uses the connection, as if it had been moved there and back.
unsafe impl Send for Pointer {}

/// A connection lent by [`lend`], for as long as that runs.
#[derive(Clone)]
pub(crate) struct Lent(Arc<Mutex<Option<Pointer>>>);

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lent")
    }
}

impl Lent {
    /// Runs `f` on the lent connection; `None` if `lend` has returned (it was given back).
    /// Other borrowers (and the end of `lend`) wait until `f` returns.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut SqliteConnection) -> T) -> Option<T> {
        let guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let pointer = guard.as_ref()?;
        // SAFETY: `lend` still runs (it clears the pointer, under this mutex, before it
        // returns), so the exclusive borrow the pointer came from is alive and unused by its
        // owner; the mutex, held until `f` returns, makes this the only use.
        let conn = unsafe { &mut *pointer.0.as_ptr() };
        Some(f(conn))
    }
}

/// Runs `f` with `conn` lent out as a [`Lent`]; when `f` returns (or unwinds), waits for any
/// borrower still using it and takes it back for good.
pub(crate) fn lend<T>(conn: &mut SqliteConnection, f: impl FnOnce(&Lent) -> T) -> T {
    struct Back(Lent);
    impl Drop for Back {
        fn drop(&mut self) {
            *self.0 .0.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }
    let back = Back(Lent(Arc::new(Mutex::new(Some(Pointer(NonNull::from(
        conn,
    )))))));
    f(&back.0)
}

/// Whether `conn` is in autocommit mode: no transaction open on it, whatever Diesel's
/// transaction manager believes (`sqlite3_get_autocommit`).
pub(crate) fn autocommit(conn: &mut SqliteConnection) -> bool {
    let db = super::RawDb::of(conn);
    // SAFETY: the handle is open (it is `conn`'s, borrowed here); reading the flag changes
    // nothing.
    unsafe { libsqlite3_sys::sqlite3_get_autocommit(db.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::connection::SimpleConnection;
    use diesel::Connection;

    #[test]
    fn a_lent_connection_is_reachable_only_while_lent() {
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        let kept = lend(&mut conn, |lent| {
            let lent = lent.clone();
            std::thread::spawn(move || {
                lent.with(|c| c.batch_execute("CREATE TABLE t (x INTEGER)"))
                    .unwrap()
                    .unwrap();
                lent
            })
            .join()
            .unwrap()
        });
        assert!(kept.with(|_| ()).is_none());
        assert!(autocommit(&mut conn));
        conn.batch_execute("BEGIN; INSERT INTO t VALUES (1);")
            .unwrap();
        assert!(!autocommit(&mut conn));
    }
}
