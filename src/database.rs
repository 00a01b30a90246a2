//! The handle of an open database: write, read, connection.

use std::cell::Cell;
use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel::result::Error as DieselError;
use diesel::sqlite::Sqlite;
use diesel::{Connection, SqliteConnection};

use crate::error::{Error, Operation, Result};
use crate::options::Options;
use crate::pragma::JournalMode;
use crate::queue::{locked, WriteQueue};
use crate::retry::{retry_locked, SystemClock};

/// The r2d2 pool of a [`Database`]: every connection carries the [`Options`]' pragmas.
pub type SqlitePool = Pool<ConnectionManager<SqliteConnection>>;

/// A connection borrowed from a [`Database`]'s pool.
pub type PooledSqlite = PooledConnection<ConnectionManager<SqliteConnection>>;

/// What one [`Database::write_measured`] cost: how long it waited for the write lock and
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

/// One SQLite database file, opened, in WAL, migrated, and ready for many processes.
///
/// # Reads and writes
/// - [`write`](Database::write) runs its closure in `BEGIN IMMEDIATE`, which takes the
///   write lock before the first statement and so waits for it (SQLite's busy handler,
///   then the retry policy). On a lock error the whole closure runs again from the start,
///   so it is `FnMut` and must not have effects outside the database that cannot repeat.
/// - [`read`](Database::read) runs its closure in a deferred (read) transaction with
///   `PRAGMA query_only` on: a consistent snapshot, and any write in it is an error.
///
/// The rule behind them: **never read and then write in a deferred transaction** (plain
/// `Connection::transaction`). When another connection commits between the read and the
/// write, SQLite returns "database is locked" at once, without calling the busy handler,
/// and only running the whole transaction again can succeed.
#[derive(Debug)]
pub struct Database {
    pool: SqlitePool,
    path: PathBuf,
    options: Options,
    journal_mode: JournalMode,
    applied: Vec<String>,
    queue: Option<WriteQueue>,
}

impl Database {
    pub(crate) fn new(
        pool: SqlitePool,
        path: PathBuf,
        options: Options,
        journal_mode: JournalMode,
        applied: Vec<String>,
        queue: Option<WriteQueue>,
    ) -> Self {
        Self {
            pool,
            path,
            options,
            journal_mode,
            applied,
            queue,
        }
    }

    /// Opens (creating if needed) the database at `path` with [`Options::new`] and applies
    /// `migrations`' pending migrations. `":memory:"` opens a private in-memory database.
    ///
    /// # Errors
    /// See [`Options::open`].
    ///
    /// # Examples
    /// ```
    /// use diesel_migrations::{embed_migrations, EmbeddedMigrations};
    /// use sqlite_persistence::Database;
    ///
    /// const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
    ///
    /// # fn main() -> sqlite_persistence::Result<()> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let db = Database::open(dir.path().join("app.db"), MIGRATIONS)?;
    /// assert_eq!(db.journal_mode(), sqlite_persistence::JournalMode::Wal);
    /// # Ok(())
    /// # }
    /// ```
    pub fn open<S: MigrationSource<Sqlite>>(path: impl AsRef<Path>, migrations: S) -> Result<Self> {
        Options::new().open(path, migrations)
    }

    /// Runs `f` in a write transaction (`BEGIN IMMEDIATE`) and commits it, running the whole
    /// closure again while the database is locked (see [`RetryPolicy`](crate::RetryPolicy)).
    ///
    /// `E` is your error type: it must convert from Diesel's and this crate's errors, and keep
    /// them in its source chain (a `#[from]` or `#[source]` field) so lock errors are found.
    /// This crate's [`Error`] does all that.
    ///
    /// # Errors
    /// What `f` returns (after a rollback); [`Error::Busy`] if the database stayed locked
    /// past the policy's deadline; [`Error::Pool`] if no connection could be had.
    ///
    /// # Examples
    /// ```
    /// # use diesel::prelude::*;
    /// # use diesel::sql_types::BigInt;
    /// # use diesel_migrations::{embed_migrations, EmbeddedMigrations};
    /// # use sqlite_persistence::Database;
    /// # const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
    /// # fn main() -> sqlite_persistence::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let db = Database::open(dir.path().join("app.db"), MIGRATIONS)?;
    /// let inserted = db.write(|conn| -> sqlite_persistence::Result<usize> {
    ///     // Read-then-write is safe here: the write lock is held from the start.
    ///     let n = diesel::sql_query("INSERT INTO counters (name) VALUES ('a')").execute(conn)?;
    ///     Ok(n)
    /// })?;
    /// assert_eq!(inserted, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnMut(&mut SqliteConnection) -> Result<T, E>,
        E: From<Error> + From<DieselError> + StdError + Send + Sync + 'static,
    {
        self.write_measured(f).map(|(value, _)| value)
    }

    /// [`write`](Database::write), also returning how long it waited and how many attempts
    /// it took.
    ///
    /// # Errors
    /// As [`write`](Database::write).
    pub fn write_measured<T, E, F>(&self, mut f: F) -> Result<(T, WriteStats), E>
    where
        F: FnMut(&mut SqliteConnection) -> Result<T, E>,
        E: From<Error> + From<DieselError> + StdError + Send + Sync + 'static,
    {
        let asked = Instant::now();
        let began = Cell::new(asked);
        let outcome = locked(
            self.queue.as_ref(),
            &self.options.retry,
            &SystemClock,
            Operation::Write,
            |_| {
                let mut conn = self.connection()?;
                conn.immediate_transaction(|conn| {
                    began.set(Instant::now());
                    f(conn)
                })
            },
        )?;
        Ok((
            outcome.value,
            WriteStats {
                wait: began.get() - asked,
                attempts: outcome.attempts,
            },
        ))
    }

    /// Runs `f` in a read transaction with `PRAGMA query_only` on, retrying on lock errors
    /// (WAL recovery after a crash, or a writer in rollback-journal mode).
    ///
    /// # Errors
    /// What `f` returns; an "attempt to write a readonly database" error if `f` writes;
    /// [`Error::Busy`] and [`Error::Pool`] as for [`write`](Database::write).
    pub fn read<T, E, F>(&self, mut f: F) -> Result<T, E>
    where
        F: FnMut(&mut SqliteConnection) -> Result<T, E>,
        E: From<Error> + From<DieselError> + StdError + Send + Sync + 'static,
    {
        retry_locked(&self.options.retry, &SystemClock, Operation::Read, |_| {
            let mut conn = self.connection()?;
            conn.batch_execute("PRAGMA query_only = ON")?;
            let conn: &mut SqliteConnection = &mut conn;
            let result = conn.transaction(&mut f);
            // query_only is per connection and the connection goes back to the pool.
            conn.batch_execute("PRAGMA query_only = OFF")?;
            result
        })
        .map(|outcome| outcome.value)
    }

    /// A connection from the pool, with the pragmas applied, for work that needs one
    /// directly. Follow the rule in the type's docs: use `immediate_transaction` for any
    /// transaction that writes.
    ///
    /// # Errors
    /// [`Error::Pool`] if r2d2 could not open or hand out a connection in time.
    pub fn connection(&self) -> Result<PooledSqlite> {
        self.pool.get().map_err(|source| Error::Pool { source })
    }

    /// The pool itself.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The database file (absolute), or `:memory:`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The journal mode in force: [`JournalMode::Wal`] unless the options asked otherwise,
    /// [`JournalMode::Memory`] for an in-memory database.
    pub fn journal_mode(&self) -> JournalMode {
        self.journal_mode
    }

    /// The names of the migrations this open applied (empty if another process had applied
    /// them, or nothing was pending).
    pub fn applied_at_open(&self) -> &[String] {
        &self.applied
    }

    /// The options it was opened with.
    pub fn options(&self) -> &Options {
        &self.options
    }
}
