//! What the handles of every engine share: the cost of a write, the checksum report, and the
//! record of the operations a thread is inside (which refuses a nested call at once).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Operation, Result};

/// What one [`Database::write_measured`](crate::Database::write_measured) (or `PgDatabase::write_measured`) cost: how long it waited for the write lock and
/// how many attempts it took. For an application's metrics on lock contention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteStats {
    /// From asking to write until the write transaction that committed began (holding the
    /// write lock): the time spent waiting for other writers, retries included.
    pub wait: Duration,
    /// How many times the transaction was started (1 when it never met a lock).
    pub attempts: u32,
}

/// What the recorded checksums of applied migrations say against the binary's SQL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Checksums {
    /// Applied migrations whose recorded checksum matches.
    pub verified: usize,
    /// Applied migrations whose SQL changed since they ran (an open refuses these).
    pub edited: Vec<String>,
    /// Applied migrations with no checksum recorded yet (applied by plain Diesel or an older
    /// layer); the next open that migrates records them.
    pub unrecorded: Vec<String>,
}

/// A new handle id, for telling handles apart in [`Inside`].
pub(crate) fn next_id() -> u64 {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

thread_local! {
    /// The databases (by handle id) this thread is inside a `write` or `read` of, innermost
    /// last, with the operation.
    static INSIDE: RefCell<Vec<(u64, Operation)>> = const { RefCell::new(Vec::new()) };
}

/// This thread is inside an operation of one database while this lives.
pub(crate) struct Inside {
    id: u64,
}

impl Inside {
    /// [`Error::Reentrant`] if this thread is already inside an operation of database `id`.
    pub(crate) fn check(id: u64, operation: Operation) -> Result<()> {
        INSIDE.with_borrow(|inside| match inside.iter().find(|(i, _)| *i == id) {
            Some(&(_, outer)) => Err(Error::Reentrant { operation, outer }),
            None => Ok(()),
        })
    }

    /// The innermost operation this thread is inside, of any database.
    pub(crate) fn current() -> Option<Operation> {
        INSIDE.with_borrow(|inside| inside.last().map(|&(_, operation)| operation))
    }

    pub(crate) fn enter(id: u64, operation: Operation) -> Result<Self> {
        Self::check(id, operation)?;
        INSIDE.with_borrow_mut(|inside| inside.push((id, operation)));
        Ok(Self { id })
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.with_borrow_mut(|inside| {
            if let Some(i) = inside.iter().rposition(|(id, _)| *id == self.id) {
                inside.remove(i);
            }
        });
    }
}

/// Whether `sql` is a rollback, a savepoint or its release: statements that follow a failed
/// one without handling it (the rollback of a nested transaction the failure itself caused),
/// so the engines' failure recorders keep the failure across them.
pub(crate) fn is_savepoint_control(sql: &str) -> bool {
    let head = sql.trim_start().as_bytes();
    ["ROLLBACK", "RELEASE", "SAVEPOINT"].iter().any(|word| {
        head.len() >= word.len() && head[..word.len()].eq_ignore_ascii_case(word.as_bytes())
    })
}
