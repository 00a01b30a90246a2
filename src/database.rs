//! Open a database (journal mode, migrations), then read and write it safely.

use std::cell::Cell;
use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::r2d2::{ConnectionManager, HandleError, Pool, PooledConnection};
use diesel::result::Error as DieselError;
use diesel::sqlite::Sqlite;
use diesel::{Connection, SqliteConnection};

use crate::customizer::ConnectionCustomizer;
use crate::error::{Error, Result};
use crate::fair::{wait_turn, WriteQueue};
use crate::migrate::{check, known, migrate, plan, read_state, Migrations};
use crate::options::{JournalMode, Options};
use crate::preflight;
use crate::retry::{retry_locked, Clock, SystemClock};
use crate::wal::ensure_journal_mode;

/// The r2d2 pool of a [`Database`]: every connection carries the [`Options`]' pragmas.
pub type SqlitePool = Pool<ConnectionManager<SqliteConnection>>;

/// A connection borrowed from a [`Database`]'s pool.
pub type PooledSqlite = PooledConnection<ConnectionManager<SqliteConnection>>;

/// What one [`Database::write_measured`] cost.
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
    ///     let n = diesel::sql_query("INSERT INTO artifacts (name) VALUES ('a')").execute(conn)?;
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
        // Queue first, then the SQLite lock: the turn is never awaited while holding one.
        let (_turn, policy) = wait_turn(self.queue.as_ref(), "write", &self.options.retry)?;
        let outcome = retry_locked(&policy, &SystemClock, "write", |_| {
            let mut conn = self.connection()?;
            conn.immediate_transaction(|conn| {
                began.set(Instant::now());
                f(conn)
            })
        })?;
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
        retry_locked(&self.options.retry, &SystemClock, "read", |_| {
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

impl Options {
    /// Opens (creating if needed) the database at `path` with these options and applies
    /// `migrations`' pending migrations. `":memory:"` opens a private in-memory database
    /// (its pool holds its one connection).
    ///
    /// In order: the migration source is listed; the file is checked before SQLite opens it
    /// (not a directory, its directory exists and is writable, the filesystem is not a
    /// network one under WAL, an existing file is writable and at least one page long)
    /// and a missing one is created with [`Options::create_mode`]; a dedicated
    /// connection opens it and gets the pragmas; what the file records (application id,
    /// applied migrations and their checksums) is read and checked; the journal mode is put
    /// in force (see [`Options::journal_mode`]); the migrations are applied atomically and
    /// exactly once across processes; then the pool is built. Every refusal comes before
    /// the first write, so a refused file is left byte-for-byte as it was.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a directory or a missing parent directory;
    /// [`Error::InvalidPath`], [`Error::Open`]; [`Error::NetworkFilesystem`];
    /// [`Error::ReadOnly`]; [`Error::NotADatabase`], [`Error::Corrupt`];
    /// [`Error::ForeignDatabase`]; [`Error::UnknownMigrations`],
    /// [`Error::EditedMigrations`], [`Error::NonTransactionalMigration`];
    /// [`Error::JournalMode`] when the file stays in another mode; [`Error::Migration`]
    /// (nothing of the batch is applied); [`Error::Storage`] when the disk is full;
    /// [`Error::Busy`] when the database stayed locked past the retry deadline.
    pub fn open<S: MigrationSource<Sqlite>>(
        self,
        path: impl AsRef<Path>,
        migrations: S,
    ) -> Result<Database> {
        let migrations: Migrations = migrations
            .migrations()
            .map_err(|source| Error::MigrationSource { source })?;
        let path = path.as_ref();
        let memory = path == Path::new(":memory:");
        let path = if memory {
            path.to_owned()
        } else {
            std::path::absolute(path).map_err(|source| Error::Io {
                operation: "resolve the path of",
                path: path.to_owned(),
                source,
            })?
        };
        let url = database_url(&path, "rwc")?;
        let customizer = ConnectionCustomizer::new(&self);
        let builder = Pool::builder()
            .max_size(if memory { 1 } else { self.pool_size })
            .min_idle(Some(if memory { 1 } else { 0 }))
            .test_on_check_out(false)
            // r2d2 panics on a zero timeout; a zero retry deadline still means "try once".
            .connection_timeout(self.retry.deadline().max(Duration::from_secs(1)))
            .error_handler(Box::new(LogPoolErrors))
            .connection_customizer(Box::new(customizer.clone()));
        let clock = SystemClock;
        let manager = ConnectionManager::<SqliteConnection>::new(url.clone());
        let (pool, setup) = if memory {
            // Each connection to :memory: is its own database: set up the pool's only one,
            // and never let r2d2 close it.
            let pool = builder
                .idle_timeout(None)
                .max_lifetime(None)
                .build(manager)
                .map_err(|source| Error::Pool { source })?;
            let mut conn = pool.get().map_err(|source| Error::Pool { source })?;
            let setup = set_up(&mut conn, &path, &migrations, &self, &clock)?;
            drop(conn);
            (pool, setup)
        } else {
            preflight::prepare(&path, &self)?;
            // A dedicated connection: its errors are typed, where r2d2 would keep a string.
            let mut conn = SqliteConnection::establish(&url).map_err(|source| Error::Open {
                path: path.clone(),
                source,
            })?;
            retry_locked(&self.retry, &clock, "apply connection pragmas", |_| {
                customizer.apply(&mut conn)
            })
            .map_err(|e| e.naming_bad_file(&path))?;
            let setup = set_up(&mut conn, &path, &migrations, &self, &clock)?;
            let pool = builder.build_unchecked(manager);
            // Open the pool's first connection before closing this one: the last connection
            // to close checkpoints the WAL and deletes it, which the next open pays for.
            drop(pool.get().map_err(|source| Error::Pool { source })?);
            drop(conn);
            (pool, setup)
        };
        Ok(Database {
            pool,
            path,
            options: self,
            journal_mode: setup.journal_mode,
            applied: setup.applied,
            queue: setup.queue,
        })
    }
}

/// What [`set_up`] did.
struct SetUp {
    journal_mode: JournalMode,
    applied: Vec<String>,
    queue: Option<WriteQueue>,
}

/// On the dedicated connection: read and check what the file records (its owner, its
/// migration history) before writing anything, so that a refused file keeps even its journal
/// mode; then the write queue, the journal mode and the migrations.
fn set_up(
    conn: &mut SqliteConnection,
    path: &Path,
    migrations: &Migrations,
    options: &Options,
    clock: &dyn Clock,
) -> Result<SetUp> {
    let known = known(migrations);
    let state = retry_locked(&options.retry, clock, "read migration state", |_| {
        read_state(conn).map_err(|source| Error::query("read migration state", source))
    })
    .map_err(|e| e.naming_bad_file(path))?
    .value;
    let plan = plan(&known, &state, options);
    check(path, &known, &state, &plan, options)?;
    let queue = if options.fair_queue && path != Path::new(":memory:") {
        Some(WriteQueue::new(path)?)
    } else {
        None
    };
    let journal_mode = ensure_journal_mode(conn, path, options, queue.as_ref(), clock)?;
    let applied = migrate(conn, path, &known, &plan, options, queue.as_ref(), clock)?;
    Ok(SetUp {
        journal_mode,
        applied,
        queue,
    })
}

/// A `file:` URI for `path`, so that no file name is ever read as an option, with SQLite's
/// open `mode` (`rwc` creates the file, `rw` does not, `ro` only reads).
pub(crate) fn database_url(path: &Path, mode: &str) -> Result<String> {
    if path == Path::new(":memory:") {
        return Ok(":memory:".to_owned());
    }
    let text = path
        .to_str()
        .filter(|text| !text.is_empty() && !text.contains('\0'))
        .ok_or_else(|| Error::InvalidPath {
            path: path.to_owned(),
        })?;
    let mut url = String::from("file:");
    for c in text.chars() {
        match c {
            '%' => url.push_str("%25"),
            '?' => url.push_str("%3F"),
            '#' => url.push_str("%23"),
            c => url.push(c),
        }
    }
    url.push_str("?mode=");
    url.push_str(mode);
    Ok(url)
}

/// r2d2 reports a connection it could not open only through its error handler, then keeps
/// trying until `connection_timeout`; log each such error with its real cause.
#[derive(Debug)]
struct LogPoolErrors;

impl HandleError<diesel::r2d2::Error> for LogPoolErrors {
    fn handle_error(&self, error: diesel::r2d2::Error) {
        tracing::error!(operation = "open pooled connection", error = %error, "pool error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_escape_what_sqlite_would_read_as_uri_syntax() {
        assert_eq!(
            database_url(Path::new("/tmp/a b/x.db"), "rwc").unwrap(),
            "file:/tmp/a b/x.db?mode=rwc"
        );
        assert_eq!(
            database_url(Path::new("/tmp/50%?#.db"), "rw").unwrap(),
            "file:/tmp/50%25%3F%23.db?mode=rw"
        );
        assert_eq!(
            database_url(Path::new(":memory:"), "rwc").unwrap(),
            ":memory:"
        );
        assert!(matches!(
            database_url(Path::new(""), "rwc"),
            Err(Error::InvalidPath { .. })
        ));
    }
}
