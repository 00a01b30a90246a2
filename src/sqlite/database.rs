//! The handle of an open database: write, read, connection.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::migration::MigrationSource;
use diesel::sqlite::Sqlite;
use diesel::SqliteConnection;

use crate::error::{Error, Operation, Result};
use crate::handle::WriteStats;
use crate::handle::{next_id, Inside};
use crate::options::Options;
use crate::pragma::JournalMode;
use crate::retry::{retry_attempts, Attempt, Deadline, SystemClock};
use crate::sqlite::closing::{OpenConnections, StillOpen};
use crate::sqlite::codes;
use crate::sqlite::customizer::within;
use crate::sqlite::group::{self, Group};
use crate::sqlite::pool::{Checkout, Connections, PooledSqlite, SqlitePool};
use crate::sqlite::queue::{locked_write, WriteQueue};
use crate::sqlite::read_age;

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
///
/// Inside a `write` or `read` closure, use the connection it is given: a `write`, `read` or
/// [`connection`](Database::connection) of the same database on the same thread would wait
/// for the first one's lock (or its pool slot), so it is refused at once with
/// [`Error::Reentrant`].
#[derive(Debug)]
pub struct Database {
    /// Tells this handle apart in the thread's record of the operations it is inside.
    id: u64,
    /// The database file's device and inode (`None` in memory): a `write` of another
    /// handle of the same file nested in this one's would wait for its own lock.
    file: Option<(u64, u64)>,
    /// The open's connection and the pool.
    connections: Connections,
    /// Whether `close` (or the drop) has run.
    closed: bool,
    /// Its connections, counted until SQLite has closed them.
    open: Arc<OpenConnections>,
    path: PathBuf,
    options: Options,
    journal_mode: JournalMode,
    applied: Vec<String>,
    queue: Option<WriteQueue>,
    /// The group commit of its writes, with [`Options::group_commit`].
    group: Option<Box<Group>>,
}

impl Database {
    pub(crate) fn new(
        connections: Connections,
        open: Arc<OpenConnections>,
        path: PathBuf,
        options: Options,
        journal_mode: JournalMode,
        applied: Vec<String>,
        queue: Option<WriteQueue>,
    ) -> Self {
        use std::os::unix::fs::MetadataExt;
        let file = std::fs::metadata(&path)
            .ok()
            .filter(|_| path != Path::new(":memory:"))
            .map(|meta| (meta.dev(), meta.ino()));
        let group = options.group_commit.then(Box::default);
        Self {
            id: next_id(),
            file,
            connections,
            closed: false,
            open,
            path,
            options,
            journal_mode,
            applied,
            group,
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
    /// `E` is your error type; it must convert from this crate's [`Error`] (to convert
    /// Diesel's too lets `?` work in `f`): your own enum, this crate's `Error`, Diesel's
    /// `QueryResult`, `anyhow::Error` and `Box<dyn Error>` all work. Whether a failure was a
    /// lock does not depend on `E`: the layer classifies its own `BEGIN IMMEDIATE` and
    /// `COMMIT` itself, and a failure of `f` by SQLite's result code of the statement of `f`
    /// that failed last, on the connection `f` was given or on any other connection this
    /// crate prepared (another `Database`'s, taken from its pool), so a lock is retried even
    /// if `E` keeps only a message, and a trigger's `RAISE(ABORT, 'database is locked')` is
    /// returned at once. On a connection this crate did not prepare (a plain
    /// `SqliteConnection`, or one whose Diesel instrumentation you replaced) there are no
    /// result codes: then only Diesel's error, this crate's and a boxed error, or one of them
    /// in their source chain, are classified, by message (see [`is_lock_error`]); a lock
    /// there inside your own error type is returned at once.
    ///
    /// [`is_lock_error`]: crate::is_lock_error
    ///
    /// The connection is taken first (the open's own, or one of the pool's: see
    /// [`pool`](Database::pool)), then the cross-process write turn (see
    /// [`Options::fair_queue`]), so that no process holds the turn while it waits for its own
    /// pool; every attempt waits in SQLite at most the time left before the deadline. With
    /// [`Options::group_commit`], a write that arrives while another of this handle holds the
    /// write transaction runs in a savepoint of it instead, and is answered after its COMMIT.
    ///
    /// # Errors
    /// What `f` returns (after a rollback); [`Error::Busy`] if the database stayed locked
    /// past the policy's deadline; [`Error::Pool`] if no connection could be had;
    /// [`Error::Reentrant`] inside a `write` or `read` of this database on this thread, or
    /// inside a `write` of another handle of the same file (it would wait for the lock the
    /// outer one holds until its deadline).
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
        E: From<Error> + 'static,
    {
        self.write_timed(Instant::now(), f, false)
            .map(|(value, _)| value)
    }

    /// [`write`](Database::write), also returning how long it waited and how many attempts
    /// it took.
    ///
    /// # Errors
    /// As [`write`](Database::write).
    pub fn write_measured<T, E, F>(&self, f: F) -> Result<(T, WriteStats), E>
    where
        F: FnMut(&mut SqliteConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        self.write_timed(Instant::now(), f, true)
    }

    /// [`write_measured`](Database::write_measured) of a write asked for at `asked` (the
    /// async handle's calls are asked for before they run here); the wait is measured (a
    /// clock read in the transaction) only if `measure`, else it is zero.
    pub(crate) fn write_timed<T, E, F>(
        &self,
        asked: Instant,
        f: F,
        measure: bool,
    ) -> Result<(T, WriteStats), E>
    where
        F: FnMut(&mut SqliteConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        let _inside = Inside::enter(self.id, Operation::Write)?;
        let _writing = Writing::enter(self.file)?;
        let deadline = Deadline::at(&SystemClock, asked, &self.options.retry);
        let Some(group) = &self.group else {
            return self.write_led(f, deadline, asked, measure, None);
        };
        let setting = group::Setting {
            policy: &self.options.retry,
            path: &self.path,
        };
        group::write(group, &setting, deadline, asked, f, |f, deadline| {
            self.write_led(f, deadline, asked, measure, Some(group))
        })
    }

    /// A write on this thread's own transaction: the pool slot, the turn, the retry loop;
    /// with `group`, as its leader.
    fn write_led<T, E, F>(
        &self,
        mut f: F,
        deadline: Deadline<'_>,
        asked: Instant,
        measure: bool,
        group: Option<&Group>,
    ) -> Result<(T, WriteStats), E>
    where
        F: FnMut(&mut SqliteConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        let began = Cell::new(asked);
        // The pool slot first, then the cross-process turn: a process never holds the turn
        // while it waits for its own pool.
        let mut conn = self.checkout()?;
        let outcome = locked_write(
            self.queue.as_ref(),
            &self.options.retry,
            deadline.read_at(Instant::now()),
            self.file,
            &self.path,
            |attempt| {
                within(&mut conn, self.options.busy_timeout, attempt.left, |conn| {
                    let f = |conn: &mut SqliteConnection| {
                        if measure {
                            began.set(Instant::now());
                        }
                        f(conn)
                    };
                    match group {
                        None => transaction(conn, "BEGIN IMMEDIATE", Operation::Write, f),
                        Some(group) => group::lead_attempt(group, conn, f),
                    }
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
    /// (WAL recovery after a crash, or a writer in rollback-journal mode). `query_only` is
    /// turned off again before the connection is used again, even if `f` panics.
    ///
    /// # Errors
    /// What `f` returns; an "attempt to write a readonly database" error if `f` writes;
    /// [`Error::Busy`], [`Error::Pool`] and [`Error::Reentrant`] as for
    /// [`write`](Database::write).
    pub fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnMut(&mut SqliteConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        self.read_from(Instant::now(), f)
    }

    /// [`read`](Database::read) of a read asked for at `asked`: its retry deadline counts from
    /// then.
    pub(crate) fn read_from<T, E, F>(&self, asked: Instant, mut f: F) -> Result<T, E>
    where
        F: FnMut(&mut SqliteConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        let _inside = Inside::enter(self.id, Operation::Read)?;
        let deadline = Deadline::at(&SystemClock, asked, &self.options.retry);
        let mut conn = self.checkout()?;
        retry_attempts(
            &self.options.retry,
            deadline.read_at(Instant::now()),
            Operation::Read,
            &self.path,
            |_| {
                let mut read_only = QueryOnly::on(&mut conn)?;
                let conn = read_only.conn();
                let Some(limit) = self.options.max_read_age else {
                    return transaction(conn, "BEGIN", Operation::Read, &mut f);
                };
                // Declared after `read_only`, so dropped (unwinding too) before it turns
                // query_only off.
                let watched =
                    codes::read_state(conn).and_then(|state| read_age::watch(&state, limit));
                let result = transaction(conn, "BEGIN", Operation::Read, &mut f);
                if watched.is_some_and(read_age::Watched::finish) {
                    // The watchdog ended the transaction; whatever `f` returned was read (or
                    // failed) outside its snapshot.
                    return Err(Attempt::Layer(Error::ReadTooLong {
                        path: self.path.clone(),
                        limit,
                    }));
                }
                result
            },
        )
        .map(|outcome| outcome.value)
    }

    /// A connection from the pool, with the pragmas applied, for work that needs one
    /// directly. Follow the rule in the type's docs: use `immediate_transaction` for any
    /// transaction that writes.
    ///
    /// # Errors
    /// [`Error::Pool`] if r2d2 could not open or hand out a connection in time;
    /// [`Error::Reentrant`] inside a `write` or `read` of this database on this thread.
    pub fn connection(&self) -> Result<PooledSqlite> {
        Inside::check(self.id, Operation::Connection)?;
        self.connections.pooled()
    }

    /// Runs `f` on a pooled connection as `operation`, refused inside a `write` or `read` of
    /// this database on this thread.
    pub(crate) fn with_connection<T>(
        &self,
        operation: Operation,
        f: impl FnOnce(&mut SqliteConnection) -> Result<T>,
    ) -> Result<T> {
        let _inside = Inside::enter(self.id, operation)?;
        let mut conn = self.checkout()?;
        f(&mut conn)
    }

    fn checkout(&self) -> Result<Checkout<'_>> {
        self.connections.checkout()
    }

    /// The pool itself, built now if no operation needed it yet. A clone of it keeps the
    /// pool, and its connections, open after this handle is closed.
    ///
    /// A handle uses the connection its open set up for one operation at a time, and builds
    /// its pool (starting r2d2's thread) only when a second connection is needed at once:
    /// a process that writes from one thread never starts a thread for it. The pool's first
    /// connection is then that one, unless an operation is using it at that moment (the
    /// pool then opens another, and the handle may briefly have one connection more than
    /// [`Options::pool_size`]).
    ///
    /// # Errors
    /// [`Error::NoThread`] if its thread cannot be started (at the process's or user's
    /// thread limit).
    pub fn pool(&self) -> Result<&SqlitePool> {
        self.connections.pool()
    }

    /// Closes the database: every connection (the open's and the pool's) is closed (the
    /// last one to close checkpoints the WAL into the database file) before this returns.
    ///
    /// It does not wait for connections the application took from the pool
    /// ([`connection`](Database::connection), [`pool`](Database::pool)) and still holds:
    /// they close when they are given back, and [`Error::StillOpen`] says where each was
    /// taken (thread, and how long ago). A clone of the pool keeps its idle connections
    /// open: they are waited for 1 s, then named too.
    ///
    /// Dropping the handle does the same, and logs instead of returning an error. r2d2 may
    /// otherwise close the last connection a moment later on its own thread, and a process
    /// that exits right after would leave its last commits in `-wal` only.
    ///
    /// # Errors
    /// [`Error::StillOpen`] if connections stayed open: a [`PooledSqlite`] or a clone of
    /// [`pool`](Database::pool) outlived the handle.
    pub fn close(mut self) -> Result<()> {
        let still = self.shut();
        match still.connections {
            0 => Ok(()),
            connections => Err(Error::StillOpen {
                path: self.path.clone(),
                connections,
                lent: still.lent,
            }),
        }
    }

    /// Closes this handle's connections and waits for them to close, except the ones the
    /// application still holds, and the idle ones of a pool it keeps (see `close`); returns
    /// what is still open.
    fn shut(&mut self) -> StillOpen {
        if std::mem::replace(&mut self.closed, true) {
            return StillOpen::default();
        }
        // A turn this process kept for its next write is given back now.
        if let Some(queue) = &self.queue {
            queue.release_kept();
        }
        self.connections.close();
        self.open.wait_closed(KEPT_POOL_GRACE, CLOSE_LIMIT)
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

/// How long a close waits for the idle connections of a pool something else keeps (a clone
/// of it, or a connection lent out): a pool being dropped on r2d2's own thread goes within
/// it; one that is kept does not go at all.
const KEPT_POOL_GRACE: Duration = Duration::from_secs(1);

/// The longest a close waits for the connections of a pool that is gone to close (r2d2
/// closes them as the pool goes, perhaps on its own thread, each checkpointing).
const CLOSE_LIMIT: Duration = Duration::from_secs(30);

impl Drop for Database {
    fn drop(&mut self) {
        let still = self.shut();
        if still.connections > 0 {
            tracing::warn!(
                path = %crate::escaped::Escaped::path(&self.path),
                connections = still.connections,
                lent = %still.lent.join("; "),
                "database dropped with connections still open (a pooled connection or a \
                 clone of its pool outlived it)"
            );
        }
    }
}

/// Runs `f` in a transaction begun with `begin`, committing if it succeeds and rolling back
/// if not. The layer's own statements (`begin`, COMMIT, ROLLBACK) fail as
/// [`Attempt::Layer`], classified by the layer whatever `E` is: a lock error there is retried
/// even when the caller's error type hides Diesel's error.
///
/// When `f` fails, its error is classified by the SQLite result code of the statement that
/// failed last on `conn`, or on another connection the layer prepared that `f` used (see
/// `codes`), read before the rollback: a lock error is found whatever `E` is, and a
/// trigger's `RAISE(ABORT, 'database is locked')` is not one.
fn transaction<T, E: 'static>(
    conn: &mut SqliteConnection,
    begin: &str,
    operation: Operation,
    f: impl FnOnce(&mut SqliteConnection) -> Result<T, E>,
) -> Result<T, Attempt<E>> {
    let layer = |source| Attempt::Layer(Error::query(operation, source));
    AnsiTransactionManager::begin_transaction_sql(conn, begin).map_err(layer)?;
    // What was recorded before belongs to earlier statements.
    let _ = codes::take(conn);
    codes::forget_this_threads();
    match f(conn) {
        Ok(value) => {
            AnsiTransactionManager::commit_transaction(conn).map_err(layer)?;
            Ok(value)
        }
        Err(error) => {
            let lock = codes::lock_failure(codes::take(conn), &error);
            AnsiTransactionManager::rollback_transaction(conn).map_err(layer)?;
            Err(Attempt::Caller { error, lock })
        }
    }
}

/// `PRAGMA query_only` on for as long as this lives: it is per connection, and the connection
/// serves other operations after, so it is turned off on drop, unwinding included.
struct QueryOnly<'c>(&'c mut SqliteConnection);

impl<'c> QueryOnly<'c> {
    fn on(conn: &'c mut SqliteConnection) -> Result<Self> {
        crate::sqlite::guard::own(|| conn.batch_execute("PRAGMA query_only = ON"))
            .map_err(|source| Error::query(Operation::Read, source))?;
        Ok(Self(conn))
    }

    fn conn(&mut self) -> &mut SqliteConnection {
        self.0
    }
}

impl Drop for QueryOnly<'_> {
    fn drop(&mut self) {
        if let Err(error) =
            crate::sqlite::guard::own(|| self.0.batch_execute("PRAGMA query_only = OFF"))
        {
            // Not expected (the pragma takes no lock); the pool then hands out a connection
            // that refuses writes, which every write reports as "readonly database".
            tracing::error!(
                operation = Operation::Read.as_str(),
                error = %crate::escaped::Escaped::new(&error.to_string()),
                "cannot turn query_only off on a pooled connection"
            );
        }
    }
}

thread_local! {
    /// The files this thread is inside a `write` of, by device and inode.
    static WRITING: std::cell::RefCell<Vec<(u64, u64)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A `write` of a file on this thread, so that another handle's `write` of the same file
/// nested in it is [`Error::Reentrant`] at once: it would wait for the write lock the outer
/// one holds until its deadline (one handle's nesting is refused by `Inside`).
struct Writing(Option<(u64, u64)>);

impl Writing {
    fn enter(file: Option<(u64, u64)>) -> Result<Self> {
        let Some(file) = file else {
            return Ok(Self(None));
        };
        WRITING.with_borrow_mut(|writing| {
            if writing.contains(&file) {
                return Err(Error::Reentrant {
                    operation: Operation::Write,
                    outer: Operation::Write,
                });
            }
            writing.push(file);
            Ok(Self(Some(file)))
        })
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        if let Some(file) = self.0 {
            WRITING.with_borrow_mut(|writing| {
                if let Some(i) = writing.iter().rposition(|f| *f == file) {
                    writing.remove(i);
                }
            });
        }
    }
}
