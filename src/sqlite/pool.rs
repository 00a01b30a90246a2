//! The connections of a [`Database`](crate::Database): the one the open set up, used directly
//! by one operation at a time, and the r2d2 pool, built when a second connection is first
//! needed.
//!
//! A pool starts threads (r2d2's scheduler, and a probe of the thread limit before it). On a
//! virtual machine a process's first threads cost it more than the rest of a warm open put
//! together: starting and handing a connection through two of them made a process that
//! opens a migrated database and writes once about a tenth slower than one that opens a
//! connection by hand. Most such processes (a CLI run, a cron job) never use a second
//! connection at once, so they never build the pool.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::time::Duration;

use diesel::r2d2::{
    ConnectionManager, HandleError, ManageConnection, Pool, PooledConnection, R2D2Connection,
};
use diesel::SqliteConnection;
use scheduled_thread_pool::ScheduledThreadPool;

use crate::error::{Error, Result};
use crate::sqlite::closing::OpenConnections;
use crate::sqlite::customizer::ConnectionCustomizer;

/// The r2d2 pool of a [`Database`](crate::Database): every connection carries the
/// [`Options`](crate::Options)' pragmas.
pub type SqlitePool = Pool<SqliteManager>;

/// A connection borrowed from a [`Database`](crate::Database)'s pool.
pub type PooledSqlite = PooledConnection<SqliteManager>;

/// A connection set up by the open, shared by the handle and its pool's manager.
type First = Arc<Mutex<Option<SqliteConnection>>>;

/// The connection manager of a [`SqlitePool`]: Diesel's `ConnectionManager`, except that it
/// hands out first the connection the open checked, set up and migrated, if the handle is
/// not using it at that moment, so that a process does not open a second SQLite connection
/// while the first is idle.
pub struct SqliteManager {
    inner: ConnectionManager<SqliteConnection>,
    first: First,
    /// Restores, at each checkout, the settings a previous user of the connection assigned.
    customizer: ConnectionCustomizer,
}

impl std::fmt::Debug for SqliteManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteManager")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl ManageConnection for SqliteManager {
    type Connection = SqliteConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<SqliteConnection, diesel::r2d2::Error> {
        // Never waits for the handle's own use of it: that would block r2d2's one thread
        // (and a pool checkout made inside that very operation, until its timeout).
        match unless_in_use(&self.first).and_then(|mut first| first.take()) {
            Some(conn) => Ok(conn),
            None => self.inner.connect(),
        }
    }

    /// Run by r2d2 at every checkout: restores the settings the connection's previous user
    /// assigned (a `PRAGMA query_only = 1` inside a `write` made every later write on the
    /// connection fail), without a statement when none was assigned. A connection whose
    /// settings cannot be restored is closed, and r2d2 hands out another.
    fn is_valid(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        self.customizer
            .restore(conn)
            .map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut SqliteConnection) -> bool {
        self.inner.has_broken(conn)
    }
}

/// The open's connection slot, unless an operation holds it now (a poisoned lock is taken:
/// the operation that panicked closed a connection it left broken, see [`Checkout`]).
fn unless_in_use(first: &First) -> Option<MutexGuard<'_, Option<SqliteConnection>>> {
    match first.try_lock() {
        Ok(first) => Some(first),
        Err(TryLockError::Poisoned(first)) => Some(first.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// The longest r2d2 is asked to wait for a connection.
const POOL_WAIT_LIMIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// What a pool is built from.
pub(crate) struct Recipe {
    /// The SQLite URL new connections open.
    pub url: String,
    /// The pool's size.
    pub max_size: u32,
    /// How long a checkout waits for a connection (the retry deadline).
    pub wait: Duration,
    /// Prepares (and counts) each connection the pool opens.
    pub customizer: ConnectionCustomizer,
    /// An in-memory database: the pool holds its one connection for good.
    pub memory: bool,
    /// The handle's open connections, which the pool's event handler tells who checked
    /// each out.
    pub open: Arc<OpenConnections>,
}

impl Recipe {
    fn build(&self, first: &First) -> Result<SqlitePool> {
        // Alive until the event handler, which the pool owns, drops (with the builder, if
        // building fails).
        self.open.pool_built();
        let builder = Pool::builder()
            .max_size(self.max_size)
            .min_idle(Some(u32::from(self.memory)))
            // The "test" restores what a previous user changed (see `is_valid`).
            .test_on_check_out(true)
            // r2d2 panics on a zero timeout (a zero retry deadline still means "try once"),
            // and on one that overflows an Instant (a deadline of Duration::MAX: a year is
            // as good as forever for a pool wait).
            .connection_timeout(self.wait.clamp(Duration::from_secs(1), POOL_WAIT_LIMIT))
            .error_handler(Box::new(LogPoolErrors))
            .event_handler(Box::new(self.open.lending()))
            .connection_customizer(Box::new(self.customizer.clone()));
        let manager = SqliteManager {
            inner: ConnectionManager::new(self.url.clone()),
            first: Arc::clone(first),
            customizer: self.customizer.clone(),
        };
        if self.memory {
            // Each connection to :memory: is its own database: the pool's only one is made
            // now, and r2d2 never closes it.
            return no_panic_on_thread_limit(|| {
                builder
                    .thread_pool(scheduler())
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .build(manager)
            })?
            .map_err(|source| Error::Pool { source });
        }
        no_panic_on_thread_limit(|| builder.thread_pool(scheduler()).build_unchecked(manager))
    }
}

/// Where a [`Database`](crate::Database)'s connections come from.
pub(crate) struct Connections {
    /// The connection the open set up, while nobody else took it: `write`, `read` and
    /// `connection` use it directly, one at a time, until the pool is built; then the pool's
    /// manager hands it out first.
    first: First,
    /// The pool, built on first need.
    pool: OnceLock<SqlitePool>,
    /// How to build it (kept: a build that failed at the thread limit is tried again).
    recipe: Mutex<Recipe>,
    /// Restores the first connection's settings (see `SqliteManager::is_valid`).
    customizer: Arc<ConnectionCustomizer>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("pool", &self.pool.get())
            .finish_non_exhaustive()
    }
}

impl Connections {
    /// The connections of a handle whose open set up `first` (already prepared and counted).
    pub(crate) fn new(first: Option<SqliteConnection>, recipe: Recipe) -> Self {
        Self {
            first: Arc::new(Mutex::new(first)),
            pool: OnceLock::new(),
            customizer: Arc::new(recipe.customizer.clone()),
            recipe: Mutex::new(recipe),
        }
    }

    /// The connections of an in-memory database: the pool, with its one connection, now.
    pub(crate) fn memory(recipe: Recipe) -> Result<Self> {
        let connections = Self::new(None, recipe);
        connections.pool()?;
        Ok(connections)
    }

    /// The pool, built now if it was not yet.
    ///
    /// # Errors
    /// [`Error::NoThread`] at the thread limit; [`Error::Pool`] (in-memory databases only) if
    /// its connection could not be opened.
    pub(crate) fn pool(&self) -> Result<&SqlitePool> {
        if let Some(pool) = self.pool.get() {
            return Ok(pool);
        }
        let recipe = self.recipe.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pool) = self.pool.get() {
            return Ok(pool);
        }
        let pool = recipe.build(&self.first)?;
        Ok(self.pool.get_or_init(|| pool))
    }

    /// A connection for one operation: the open's own while no pool exists and nobody uses
    /// it, else one of the pool's (building it).
    pub(crate) fn checkout(&self) -> Result<Checkout<'_>> {
        if self.pool.get().is_none() {
            if let Some(mut first) = unless_in_use(&self.first).filter(|first| first.is_some()) {
                let conn = first.as_mut().expect("filtered on it");
                if self.customizer.restore(conn).is_ok() {
                    return Ok(Checkout::First(first));
                }
                // Its settings could not be restored: closed, and the pool's used instead.
                drop(first.take());
            }
        }
        self.pooled().map(Checkout::Pooled)
    }

    /// A connection of the pool (building it).
    ///
    /// # Errors
    /// As [`pool`](Connections::pool); [`Error::Pool`] if r2d2 could not open or hand out a
    /// connection in time.
    pub(crate) fn pooled(&self) -> Result<PooledSqlite> {
        self.pool()?.get().map_err(|source| Error::Pool { source })
    }

    /// Closes the pool (connections still checked out close when they are given back) and
    /// the open's connection; returns how many of the pool's were checked out.
    pub(crate) fn close(&mut self) -> usize {
        let checked_out = self.pool.take().map_or(0, |pool| {
            let state = pool.state();
            (state.connections - state.idle_connections) as usize
        });
        let first = self
            .first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(first);
        checked_out
    }
}

/// A connection lent for one operation.
// Diesel 2.4's connection (inside r2d2's pooled one) is large; a checkout lives on the stack
// for one operation, and boxing it would cost an allocation per checkout.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Checkout<'a> {
    /// The open's own connection, used directly.
    First(MutexGuard<'a, Option<SqliteConnection>>),
    /// One of the pool's.
    Pooled(PooledSqlite),
}

impl Deref for Checkout<'_> {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        match self {
            Checkout::First(first) => first.as_ref().expect("checked out only while there"),
            Checkout::Pooled(conn) => conn,
        }
    }
}

impl DerefMut for Checkout<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        match self {
            Checkout::First(first) => first.as_mut().expect("checked out only while there"),
            Checkout::Pooled(conn) => conn,
        }
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        // As r2d2 does with its own: a connection left broken or inside a transaction (its
        // operation panicked) is closed, not used again.
        if let Checkout::First(first) = self {
            if first.as_mut().is_some_and(R2D2Connection::is_broken) {
                drop(first.take());
            }
        }
    }
}

/// A pool's scheduler: one thread, where r2d2 would start three for each pool. It opens
/// connections and closes idle ones, off the callers' threads. Each pool has its own, so
/// that its jobs (the reaper of idle connections) end with it.
fn scheduler() -> Arc<ScheduledThreadPool> {
    Arc::new(
        ScheduledThreadPool::builder()
            .num_threads(1)
            .thread_name_pattern("sqlite-persistence-pool")
            .build(),
    )
}

/// Builds an r2d2 pool, whose scheduler starts threads and panics if it cannot (at a
/// process's or user's thread limit): [`Error::NoThread`] instead. Until a thread has been
/// started once in this process, one is tried first, so that the usual case (no thread at
/// all can be started) is an error without a panic's message; the panic is caught too.
fn no_panic_on_thread_limit<T>(build: impl FnOnce() -> T) -> Result<T> {
    static STARTED_ONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let what = "the connection pool's scheduler";
    if !STARTED_ONE.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::Builder::new()
            .spawn(|| {})
            .map(|probe| drop(probe.join()))
            .map_err(|e| Error::NoThread {
                what,
                cause: e.to_string(),
            })?;
        STARTED_ONE.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(build)).map_err(|panic| {
        let cause = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("a panic")
            .to_owned();
        Error::NoThread { what, cause }
    })
}

/// r2d2 reports a connection it could not open only through its error handler, then keeps
/// trying until `connection_timeout`; log each such error with its real cause.
#[derive(Debug)]
struct LogPoolErrors;

impl HandleError<diesel::r2d2::Error> for LogPoolErrors {
    fn handle_error(&self, error: diesel::r2d2::Error) {
        tracing::error!(operation = "open pooled connection", error = %crate::escaped::Escaped::new(&error.to_string()), "pool error");
    }
}
