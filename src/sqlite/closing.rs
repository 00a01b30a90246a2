//! Knowing when a pool's connections are really closed.
//!
//! r2d2 closes a pool's idle connections on whichever thread drops the pool's last handle,
//! which may be its own worker thread, a moment after the `Database` is gone: a process that
//! exits then leaves its last commits in `-wal` only (the closing connection checkpoints
//! them). So every pooled connection carries a token inside a SQL function registered on
//! it. SQLite destroys a connection's functions at the end of `sqlite3_close`, after it has
//! closed the file and checkpointed the WAL, and Diesel drops the function's closure then:
//! the token's drop says "this connection is closed", on any thread.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel::r2d2::event::{CheckinEvent, CheckoutEvent};
use diesel::r2d2::HandleEvent;
use diesel::SqliteConnection;

use crate::operation::Operation;

diesel::define_sql_function! {
    /// Registered on every pooled connection; never called. Its closure holds the
    /// connection's token.
    fn sqlite_persistence_connection_token() -> Integer;
}

/// How many connections of one pool are open, which of them the pool has lent out (and to
/// whom), and whether the pool itself still exists.
#[derive(Debug, Default)]
pub(crate) struct OpenConnections {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    open: usize,
    /// The pool's connections checked out now, by r2d2's connection id.
    lent: HashMap<u64, Lent>,
    /// Whether a pool is built and not gone yet (some handle of it, or a connection it lent
    /// out, still keeps it).
    pool_alive: bool,
}

/// Who took a connection out of the pool, and when.
#[derive(Debug, Clone)]
struct Lent {
    thread: String,
    operation: Option<Operation>,
    since: Instant,
}

impl std::fmt::Display for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.operation {
            Some(operation) => write!(f, "one in a {operation}")?,
            None => f.write_str("one taken with Database::connection or from Database::pool")?,
        }
        write!(
            f,
            " on thread {} {:.1} s ago",
            crate::escaped::Escaped::new(&self.thread),
            self.since.elapsed().as_secs_f64()
        )
    }
}

/// What is still open after a handle closed.
#[derive(Debug, Default)]
pub(crate) struct StillOpen {
    /// Connections still open.
    pub connections: usize,
    /// Of them, those the pool lent out, described; the others are idle in a pool something
    /// else keeps (a clone of `Database::pool`, or a connection lent out, which holds it).
    pub lent: Vec<String>,
}

/// One open connection, counted until it is dropped.
struct Token(Arc<OpenConnections>);

impl Drop for Token {
    fn drop(&mut self) {
        self.0
            .update(|state| state.open = state.open.saturating_sub(1));
    }
}

impl OpenConnections {
    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_all();
    }

    /// Counts `conn` until SQLite has closed it.
    pub(crate) fn track(self: &Arc<Self>, conn: &mut SqliteConnection) -> diesel::QueryResult<()> {
        self.update(|state| state.open += 1);
        let token = Token(Arc::clone(self));
        sqlite_persistence_connection_token_utils::register_impl(conn, move || {
            let _ = &token;
            0
        })
        // If registering failed, Diesel dropped the closure, and with it the token.
    }

    /// The pool's event handler, which records who checks its connections out; its drop
    /// (with the pool) says the pool is gone.
    pub(crate) fn lending(self: &Arc<Self>) -> Lending {
        Lending(Arc::clone(self))
    }

    /// Waits, at most `limit`, until every connection is closed, except those the pool lent
    /// out (they close when they are given back: waiting for them would wait for the
    /// application) and the idle ones of a pool that something still keeps `grace` after
    /// this call; returns what is still open.
    pub(crate) fn wait_closed(&self, grace: Duration, limit: Duration) -> StillOpen {
        let start = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while state.open > 0 && state.lent.is_empty() {
            // A pool that is gone closed its idle connections as it went (on r2d2's thread,
            // perhaps, a moment later); one still kept keeps them.
            let until = if state.pool_alive {
                grace.min(limit)
            } else {
                limit
            };
            let wait = until.saturating_sub(start.elapsed());
            if wait.is_zero() {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let mut lent: Vec<&Lent> = state.lent.values().collect();
        lent.sort_by_key(|lent| lent.since);
        StillOpen {
            connections: state.open,
            lent: lent.iter().map(|lent| lent.to_string()).collect(),
        }
    }

    /// Records that a pool is built: it is gone when its event handler drops.
    pub(crate) fn pool_built(&self) {
        self.update(|state| state.pool_alive = true);
    }
}

/// r2d2's event handler of a `Database`'s pool: who checked out which connection, and when.
#[derive(Debug)]
pub(crate) struct Lending(Arc<OpenConnections>);

impl HandleEvent for Lending {
    fn handle_checkout(&self, event: CheckoutEvent) {
        // On the thread that checks it out, inside the layer's operation if one does.
        let thread = std::thread::current();
        let lent = Lent {
            thread: thread
                .name()
                .map_or_else(|| format!("{:?}", thread.id()), str::to_owned),
            operation: crate::handle::Inside::current(),
            since: Instant::now(),
        };
        self.0.update(|state| {
            state.lent.insert(event.connection_id(), lent);
        });
    }

    fn handle_checkin(&self, event: CheckinEvent) {
        self.0.update(|state| {
            state.lent.remove(&event.connection_id());
        });
    }
}

impl Drop for Lending {
    fn drop(&mut self) {
        self.0.update(|state| state.pool_alive = false);
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
        let zero = Duration::ZERO;
        assert_eq!(open.wait_closed(zero, zero).connections, 2);
        drop(a);
        assert_eq!(open.wait_closed(zero, zero).connections, 1);
        // Closed on another thread: the wait sees it.
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(b);
        });
        let limit = Duration::from_secs(10);
        assert_eq!(open.wait_closed(limit, limit).connections, 0);
        closer.join().unwrap();
        // A bounded wait for a connection that stays open gives up; one of a pool something
        // still keeps is waited for only the grace.
        let mut c = SqliteConnection::establish(":memory:").unwrap();
        open.track(&mut c).unwrap();
        let start = Instant::now();
        assert_eq!(
            open.wait_closed(limit, Duration::from_millis(100))
                .connections,
            1
        );
        assert!(start.elapsed() >= Duration::from_millis(100));
        open.pool_built();
        let start = Instant::now();
        assert_eq!(
            open.wait_closed(Duration::from_millis(100), limit)
                .connections,
            1
        );
        assert!(start.elapsed() < limit);
    }
}
