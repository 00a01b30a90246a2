//! The r2d2 pool of a [`Database`](crate::Database): Diesel's connection manager, which
//! hands out first the connection the open already set up, and one scheduler thread.

use std::sync::{Arc, Mutex, PoisonError};

use diesel::r2d2::{ConnectionManager, ManageConnection, Pool, PooledConnection};
use diesel::SqliteConnection;
use scheduled_thread_pool::ScheduledThreadPool;

/// The r2d2 pool of a [`Database`](crate::Database): every connection carries the
/// [`Options`](crate::Options)' pragmas.
pub type SqlitePool = Pool<SqliteManager>;

/// A connection borrowed from a [`Database`](crate::Database)'s pool.
pub type PooledSqlite = PooledConnection<SqliteManager>;

/// The connection manager of a [`SqlitePool`]: Diesel's `ConnectionManager`, except that
/// the first connection it hands out is the one the open checked, set up and migrated, so
/// that a process opens one SQLite connection, not two, before its first write.
pub struct SqliteManager {
    inner: ConnectionManager<SqliteConnection>,
    first: Mutex<Option<SqliteConnection>>,
}

impl std::fmt::Debug for SqliteManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteManager")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl SqliteManager {
    /// Diesel's manager for `url`, handing out `first` before it opens any.
    pub(crate) fn new(url: String, first: Option<SqliteConnection>) -> Self {
        Self {
            inner: ConnectionManager::new(url),
            first: Mutex::new(first),
        }
    }
}

impl ManageConnection for SqliteManager {
    type Connection = SqliteConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<SqliteConnection, diesel::r2d2::Error> {
        let first = self
            .first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match first {
            Some(conn) => Ok(conn),
            None => self.inner.connect(),
        }
    }

    fn is_valid(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        self.inner.is_valid(conn)
    }

    fn has_broken(&self, conn: &mut SqliteConnection) -> bool {
        self.inner.has_broken(conn)
    }
}

/// A pool's scheduler: one thread, where r2d2 would start three for each pool (a process
/// that opens one database and writes once paid for four threads). It opens connections and
/// closes idle ones, off the callers' threads. Each pool has its own, so that its jobs (the
/// reaper of idle connections) end with it.
pub(crate) fn scheduler() -> Arc<ScheduledThreadPool> {
    Arc::new(
        ScheduledThreadPool::builder()
            .num_threads(1)
            .thread_name_pattern("sqlite-persistence-pool")
            .build(),
    )
}
