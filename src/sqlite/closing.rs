//! Knowing when a pool's connections are really closed.
//!
//! r2d2 closes a pool's idle connections on whichever thread drops the pool's last handle,
//! which may be its own worker thread, a moment after the `Database` is gone: a process that
//! exits then leaves its last commits in `-wal` only (the closing connection checkpoints
//! them). So every pooled connection carries a token inside a SQL function registered on
//! it. SQLite destroys a connection's functions at the end of `sqlite3_close`, after it has
//! closed the file and checkpointed the WAL, and Diesel drops the function's closure then:
//! the token's drop says "this connection is closed", on any thread.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel::SqliteConnection;

diesel::define_sql_function! {
    /// Registered on every pooled connection; never called. Its closure holds the
    /// connection's token.
    fn sqlite_persistence_connection_token() -> Integer;
}

/// How many connections of one pool are open.
#[derive(Debug, Default)]
pub(crate) struct OpenConnections {
    count: Mutex<usize>,
    closed: Condvar,
}

/// One open connection, counted until it is dropped.
struct Token(Arc<OpenConnections>);

impl Drop for Token {
    fn drop(&mut self) {
        let mut count = self.0.count.lock().unwrap_or_else(PoisonError::into_inner);
        *count = count.saturating_sub(1);
        self.0.closed.notify_all();
    }
}

impl OpenConnections {
    /// Counts `conn` until SQLite has closed it.
    pub(crate) fn track(self: &Arc<Self>, conn: &mut SqliteConnection) -> diesel::QueryResult<()> {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        let token = Token(Arc::clone(self));
        sqlite_persistence_connection_token_utils::register_impl(conn, move || {
            let _ = &token;
            0
        })
        // If registering failed, Diesel dropped the closure, and with it the token.
    }

    /// Waits until at most `left` connections are open, or `limit` passed; returns how many
    /// are open.
    pub(crate) fn wait_until_at_most(&self, left: usize, limit: Duration) -> usize {
        let deadline = Instant::now().checked_add(limit);
        let mut count = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        while *count > left {
            let wait = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if wait.is_zero() {
                break;
            }
            count = self
                .closed
                .wait_timeout(count, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::Connection;

    #[test]
    fn a_connection_is_counted_until_sqlite_has_closed_it() {
        let open = Arc::new(OpenConnections::default());
        let mut a = SqliteConnection::establish(":memory:").unwrap();
        let mut b = SqliteConnection::establish(":memory:").unwrap();
        open.track(&mut a).unwrap();
        open.track(&mut b).unwrap();
        assert_eq!(open.wait_until_at_most(2, Duration::ZERO), 2);
        drop(a);
        assert_eq!(open.wait_until_at_most(1, Duration::ZERO), 1);
        // Closed on another thread: the wait sees it.
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(b);
        });
        assert_eq!(open.wait_until_at_most(0, Duration::from_secs(10)), 0);
        closer.join().unwrap();
        // A bounded wait for a connection that stays open gives up.
        let mut c = SqliteConnection::establish(":memory:").unwrap();
        open.track(&mut c).unwrap();
        let start = Instant::now();
        assert_eq!(open.wait_until_at_most(0, Duration::from_millis(100)), 1);
        assert!(start.elapsed() >= Duration::from_millis(100));
    }
}
