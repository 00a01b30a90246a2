//! The baseline: the setup most Diesel applications write, kept to show what the layer
//! fixes. It uses Diesel alone (and the library's public API for nothing but the catalog's
//! migrations and types).
//!
//! `busy_timeout` and `journal_mode = WAL` in an r2d2 customizer, `run_pending_migrations` at
//! startup, the default deferred transaction for writes, no retry. The command line runs it
//! with `record --plain`, the tests and `stress --compare` use that to show it failing under
//! the same load the layer survives. Not for use in applications.

use std::path::Path;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use diesel::sqlite::Sqlite;
use diesel::{Connection, SqliteConnection};
use diesel_migrations::MigrationHarness;
/// The plain setup's pool: Diesel's own connection manager.
type PlainPool = Pool<ConnectionManager<SqliteConnection>>;
/// A connection of it.
pub type PlainConnection = diesel::r2d2::PooledConnection<ConnectionManager<SqliteConnection>>;

use crate::catalog::{record_next, validate_artifact_name, Recorded, MIGRATIONS};
use crate::error::{Error, Result};

/// The lean baseline: what a careful Diesel user writes by hand. One connection, no pool;
/// `busy_timeout` 5 s and WAL; `run_pending_migrations`; each write in an
/// `immediate_transaction` (the write lock up front), no retry. The strongest plain setup
/// for one process's speed (it has none of the layer's guarantees under concurrency).
pub struct LeanCatalog {
    conn: std::cell::RefCell<SqliteConnection>,
}

impl std::fmt::Debug for LeanCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeanCatalog").finish_non_exhaustive()
    }
}

impl LeanCatalog {
    /// Opens one connection, sets the pragmas and runs `run_pending_migrations`.
    ///
    /// # Errors
    /// Whatever the lean setup meets.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let url = path.as_ref().to_string_lossy().into_owned();
        let mut conn = SqliteConnection::establish(&url).map_err(|source| Error::Open {
            path: path.as_ref().to_owned(),
            source,
        })?;
        conn.batch_execute("PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL;")
            .map_err(|source| Error::Query {
                operation: "set the pragmas",
                source,
            })?;
        conn.run_pending_migrations(MIGRATIONS)
            .map_err(|source| Error::Baseline {
                operation: "run_pending_migrations",
                source,
            })?;
        Ok(Self {
            conn: std::cell::RefCell::new(conn),
        })
    }

    /// Records the next version in an `immediate_transaction`, without retrying.
    ///
    /// # Errors
    /// "database is locked" past `busy_timeout`.
    pub fn record_holding(&self, artifact: &str, hold: Duration) -> Result<Recorded> {
        record_once(artifact, hold, record_next, |record| {
            Ok(self.conn.borrow_mut().immediate_transaction(record))
        })
    }
}

/// Records the next version of `artifact` once, with `transaction` (a baseline's own kind of
/// transaction around the statements `record` runs), without retrying. The wait is from
/// asking to commit, less the simulated work: a deferred `BEGIN` returns at once, and its
/// waiting happens inside the statements (the busy handler).
pub(crate) fn record_once<C>(
    artifact: &str,
    hold: Duration,
    record: fn(&mut C, &str, Duration) -> diesel::QueryResult<i64>,
    transaction: impl FnOnce(
        &mut dyn FnMut(&mut C) -> diesel::QueryResult<i64>,
    ) -> Result<diesel::QueryResult<i64>>,
) -> Result<Recorded> {
    validate_artifact_name(artifact)?;
    let asked = Instant::now();
    let version =
        transaction(&mut |conn| record(conn, artifact, hold))?.map_err(|source| Error::Query {
            operation: "record a version",
            source,
        })?;
    Ok(Recorded {
        artifact: artifact.to_owned(),
        version,
        wait: asked.elapsed().saturating_sub(hold),
        attempts: 1,
    })
}

#[derive(Debug)]
struct PlainCustomizer;

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for PlainCustomizer {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(
            "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON;",
        )
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// The catalog opened the plain way.
#[derive(Debug)]
pub struct PlainCatalog {
    pool: PlainPool,
}

impl PlainCatalog {
    /// Builds the pool and runs `run_pending_migrations` on one of its connections.
    ///
    /// # Errors
    /// Whatever the plain setup meets: "database is locked", "table ... already exists", ...
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, MIGRATIONS)
    }

    /// [`open`](PlainCatalog::open) with other migrations.
    ///
    /// # Errors
    /// As [`open`](PlainCatalog::open).
    pub fn open_with<S: MigrationSource<Sqlite>>(
        path: impl AsRef<Path>,
        migrations: S,
    ) -> Result<Self> {
        // As plain applications do: the path as the database URL.
        let manager = ConnectionManager::<SqliteConnection>::new(path.as_ref().to_string_lossy());
        let pool = Pool::builder()
            .max_size(2)
            .connection_customizer(Box::new(PlainCustomizer))
            // Fail like an application does, instead of r2d2 retrying for 30 s.
            .connection_timeout(Duration::from_secs(10))
            .build(manager)
            .map_err(|source| Error::Pool { source })?;
        let mut conn = pool.get().map_err(|source| Error::Pool { source })?;
        conn.run_pending_migrations(migrations)
            .map_err(|source| Error::Baseline {
                operation: "run_pending_migrations",
                source,
            })?;
        drop(conn);
        Ok(Self { pool })
    }

    /// A connection from its pool, for reads the plain way.
    ///
    /// # Errors
    /// [`Error::Pool`] if r2d2 could not hand one out.
    pub fn connection(&self) -> Result<PlainConnection> {
        self.pool.get().map_err(|source| Error::Pool { source })
    }

    /// Records the next version in a deferred transaction, without retrying.
    ///
    /// # Errors
    /// "database is locked" whenever another process committed first.
    pub fn record_holding(&self, artifact: &str, hold: Duration) -> Result<Recorded> {
        record_once(artifact, hold, record_next, |record| {
            let mut conn = self.pool.get().map_err(|source| Error::Pool { source })?;
            Ok((*conn).transaction(record))
        })
    }
}
