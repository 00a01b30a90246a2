//! [`AsyncDatabase`]: the same handle for tokio applications, behind the `tokio` feature.
//!
//! A [`Database`] call blocks its thread while it waits for the write lock, sleeps between
//! retries and runs the closure. On a tokio worker that stalls every other task of the
//! worker for as long, up to the retry deadline. `AsyncDatabase` runs each call as blocking
//! work instead, at most as many at once as the pool has connections; callers beyond that
//! wait asynchronously for a slot:
//! - on a multi-thread runtime, with `block_in_place`: the calling thread hands its worker
//!   role and its other tasks to another thread, runs the call, and becomes a worker again.
//!   An uncontended write then costs what the blocking one does, where a hand-off to a
//!   blocking thread and back costs more than a short write itself;
//! - on a current-thread runtime (whose only thread cannot hand its role over), on tokio's
//!   blocking threads (`spawn_blocking`).

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use ::tokio::runtime::{Handle, RuntimeFlavor};
use ::tokio::sync::Semaphore;
use diesel::migration::MigrationSource;
use diesel::sqlite::Sqlite;
use diesel::SqliteConnection;

use crate::error::{Error, Operation, Result};
use crate::handle::WriteStats;
use crate::options::Options;
use crate::sqlite::database::Database;

/// A [`Database`] for async code: every call runs as blocking work (within the calling
/// worker's `block_in_place` on a multi-thread runtime, on tokio's blocking threads on a
/// current-thread one), at most as many at once as the pool has connections, and writes of
/// one handle take turns asynchronously, in arrival order, before they take a thread. Cheap
/// to clone; the clones share the database.
///
/// # Cancellation
/// Dropping the future of a `write`, `read` or `interact` (a timeout, a client that went
/// away) is safe, and what happened is one of two things:
/// - the call had not begun (it was waiting for a slot, or its blocking task had not started):
///   it never runs; nothing of it reaches the database;
/// - it had begun: it runs to its end, as the blocking API would, and its transaction is
///   committed or rolled back, never left open, its connection returned to the pool clean.
///   (On a multi-thread runtime a call runs within one poll of its future, so the future
///   cannot be dropped while it runs.) On a current-thread runtime, where it runs on a
///   blocking thread, the outcome of a call whose future was dropped meanwhile is logged at
///   `info` (`operation`, `outcome`: `committed`, `failed` or `panicked`), since nobody is
///   left to receive it.
///
/// So after a drop, a caller may assume only that the write was applied at most once, and
/// entirely or not at all; to know which, make the write idempotent or look for its effect.
/// A write is never applied twice: the layer retries a closure only after its transaction
/// rolled back.
///
/// # Examples
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> sqlite_persistence::Result<()> {
/// use diesel::RunQueryDsl;
/// use diesel_migrations::{embed_migrations, EmbeddedMigrations};
/// use sqlite_persistence::AsyncDatabase;
///
/// const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
///
/// let dir = tempfile::tempdir().unwrap();
/// let db = AsyncDatabase::open(dir.path().join("app.db"), MIGRATIONS).await?;
/// let inserted = db
///     .write(|conn| -> sqlite_persistence::Result<usize> {
///         Ok(diesel::sql_query("INSERT INTO counters (name) VALUES ('a')").execute(conn)?)
///     })
///     .await?;
/// assert_eq!(inserted, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct AsyncDatabase {
    database: Arc<Database>,
    /// One permit per pooled connection: how many calls run on blocking threads at once.
    slots: Arc<Semaphore>,
    /// This handle's writes take turns here first, in arrival order: SQLite lets one write at
    /// a time anyway, and a task waiting here holds no thread, where one waiting for the
    /// write lock would hold a blocking thread.
    writer: Arc<::tokio::sync::Mutex<()>>,
}

/// Where one call is, shared by its future and its blocking task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not begun.
    Waiting,
    /// Begun, its future still there.
    Running,
    /// Its future was dropped before it began: it never will.
    Abandoned,
    /// Its future was dropped while it ran: its outcome is logged.
    Orphaned,
    /// Over, its outcome handed to its future.
    Done,
}

/// Marks the call abandoned or orphaned if its future is dropped before it finishes.
struct Watch(Arc<Mutex<Phase>>);

impl Watch {
    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut phase = self.phase();
        *phase = match *phase {
            Phase::Waiting => Phase::Abandoned,
            Phase::Running => Phase::Orphaned,
            done => done,
        };
    }
}

impl AsyncDatabase {
    /// Opens the database at `path` with [`Options::new`], as [`Database::open`] does, on a
    /// blocking thread: the migrations run off the runtime's workers.
    ///
    /// # Errors
    /// As [`Options::open`]; [`Error::Cancelled`] if the runtime is shutting down.
    pub async fn open<S>(path: impl AsRef<Path>, migrations: S) -> Result<Self>
    where
        S: MigrationSource<Sqlite> + Send + 'static,
    {
        Self::open_with(Options::new(), path, migrations).await
    }

    /// Opens the database at `path` with `options`, as [`Options::open`] does, on a blocking
    /// thread.
    ///
    /// # Errors
    /// As [`Options::open`]; [`Error::Cancelled`] if the runtime is shutting down.
    pub async fn open_with<S>(
        options: Options,
        path: impl AsRef<Path>,
        migrations: S,
    ) -> Result<Self>
    where
        S: MigrationSource<Sqlite> + Send + 'static,
    {
        let path = path.as_ref().to_owned();
        match ::tokio::task::spawn_blocking(move || options.open(path, migrations)).await {
            Ok(opened) => opened.map(Self::from),
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Err(Error::Cancelled {
                operation: Operation::Migrate,
            }),
        }
    }

    /// [`Database::write`] on a blocking thread: `f` runs in `BEGIN IMMEDIATE`, again while
    /// the database is locked, and commits.
    ///
    /// # Errors
    /// As [`Database::write`]; [`Error::Cancelled`] if the runtime is shutting down.
    ///
    /// # Panics
    /// If `f` panics, with its panic, once its transaction rolled back; the handle and its
    /// pool stay usable.
    pub async fn write<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        F: FnMut(&mut SqliteConnection) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let _turn = self.writer.lock().await;
        self.run(Operation::Write, move |db| db.write(f)).await
    }

    /// [`write`](AsyncDatabase::write), also returning how long it waited for the lock and
    /// how many attempts it took. The wait for a blocking slot is not in it.
    ///
    /// # Errors
    /// As [`write`](AsyncDatabase::write).
    pub async fn write_measured<T, E, F>(&self, f: F) -> std::result::Result<(T, WriteStats), E>
    where
        F: FnMut(&mut SqliteConnection) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let _turn = self.writer.lock().await;
        self.run(Operation::Write, move |db| db.write_measured(f))
            .await
    }

    /// [`Database::read`] on a blocking thread: `f` runs in a read transaction with
    /// `query_only` on.
    ///
    /// # Errors
    /// As [`Database::read`]; [`Error::Cancelled`] if the runtime is shutting down.
    pub async fn read<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        F: FnMut(&mut SqliteConnection) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        self.run(Operation::Read, move |db| db.read(f)).await
    }

    /// Runs `f` with a connection of the pool, on a blocking thread: for work that needs one
    /// directly (use `immediate_transaction` for anything that writes, as with
    /// [`Database::connection`]).
    ///
    /// # Errors
    /// As [`Database::connection`]; [`Error::Cancelled`] if the runtime is shutting down.
    pub async fn interact<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut SqliteConnection) -> T + Send + 'static,
        T: Send + 'static,
    {
        self.run(Operation::Connection, move |db| {
            db.with_connection(Operation::Connection, |conn| Ok(f(conn)))
        })
        .await
    }

    /// The blocking handle, for code that runs on a blocking thread already.
    pub fn blocking(&self) -> &Database {
        &self.database
    }

    /// Runs `call` on a blocking thread once a slot is free, cancellation-safe.
    async fn run<T, E, C>(&self, operation: Operation, call: C) -> std::result::Result<T, E>
    where
        C: FnOnce(&Database) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let watch = Watch(Arc::new(Mutex::new(Phase::Waiting)));
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
            // On a multi-thread runtime the call runs on this thread, which hands its worker
            // role (and its other tasks) to another thread meanwhile: no hand-off to a
            // blocking thread and back, which cost more than the write itself. It runs within
            // this one poll, so it can no longer be dropped halfway.
            *watch.phase() = Phase::Done;
            let _permit = permit;
            return ::tokio::task::block_in_place(|| call(&self.database));
        }
        let database = Arc::clone(&self.database);
        let phase = Arc::clone(&watch.0);
        let task = ::tokio::task::spawn_blocking(move || {
            let _permit = permit;
            {
                let mut phase = phase.lock().unwrap_or_else(PoisonError::into_inner);
                if *phase == Phase::Abandoned {
                    tracing::debug!(
                        operation = operation.as_str(),
                        "dropped before it began: not run"
                    );
                    return None;
                }
                *phase = Phase::Running;
            }
            let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(&database)));
            let orphaned = *phase.lock().unwrap_or_else(PoisonError::into_inner) == Phase::Orphaned;
            if orphaned {
                tracing::info!(
                    db.namespace = %crate::escaped::Escaped::path(database.path()),
                    operation = operation.as_str(),
                    outcome = match &ended {
                        Ok(Ok(_)) => "committed",
                        Ok(Err(_)) => "failed",
                        Err(_) => "panicked",
                    },
                    "finished after its caller dropped it"
                );
            }
            Some(ended)
        });
        let ended = task.await;
        // From here the call is over: dropping `watch` changes nothing.
        *watch.phase() = Phase::Done;
        drop(watch);
        match ended {
            Ok(Some(Ok(result))) => result,
            Ok(Some(Err(panic))) => std::panic::resume_unwind(panic),
            // Only a dropped future abandons a call, and a dropped future awaits nothing.
            Ok(None) => Err(E::from(Error::Cancelled { operation })),
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Err(E::from(Error::Cancelled { operation })),
        }
    }
}

impl From<Database> for AsyncDatabase {
    fn from(database: Database) -> Self {
        let slots = database.options().pool_size as usize;
        Self {
            database: Arc::new(database),
            slots: Arc::new(Semaphore::new(slots)),
            writer: Arc::default(),
        }
    }
}
