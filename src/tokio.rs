//! [`AsyncDatabase`]: the same handle for tokio applications, behind the `tokio` feature, over
//! either engine.
//!
//! A [`Database`](crate::Database) (or `PgDatabase`) call blocks its thread while it waits
//! for a lock, sleeps between retries and runs the closure. On a tokio worker that stalls
//! every other task of the worker for as long, up to the retry deadline. `AsyncDatabase` runs
//! each call on tokio's blocking threads (`spawn_blocking`) instead, at most as many at once
//! as the pool has connections; callers beyond that wait asynchronously for a slot.
//!
//! Every runtime flavour and context takes the same path: a multi-thread or current-thread
//! runtime, a task of a `LocalSet`, a `Handle::block_on`. (`block_in_place` would save the
//! hand-off to a blocking thread on a multi-thread runtime's workers, but it panics inside a
//! `LocalSet` and tokio offers no way to ask beforehand whether it would.)
//!
//! A call made while the calling thread is already inside a call of this layer (a closure
//! that awaits another call with `Handle::block_on` or any other executor) runs there at
//! once, as the blocking API's call would: on the same database it is refused with
//! [`Error::Reentrant`], where waiting for the outer call's turn or slot would wait forever.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use ::tokio::sync::Semaphore;

use crate::error::{Error, Operation, Result};
use crate::handle::{next_id, Inside, WriteStats};
use crate::options::Options;

#[cfg(feature = "postgres")]
use crate::postgres::PgDatabase;
#[cfg(feature = "sqlite")]
use crate::sqlite::database::Database;

mod sealed {
    use super::{BlockingDatabase, Error, Result, WriteStats};

    /// What [`AsyncDatabase`](super::AsyncDatabase) needs of a blocking handle; implemented
    /// only by this crate's handles.
    pub trait Sealed {
        /// OpenTelemetry's `db.system.name` of the engine, for the events.
        const SYSTEM: &'static str;
        /// Whether the writes of one handle queue and run one after another on one blocking
        /// thread: the engine runs one write at a time anyway.
        const SERIAL_WRITES: bool;

        /// The database as the events show it (its path, or its URL without the password).
        fn namespace(&self) -> String;

        /// The options it was opened with.
        fn options(&self) -> &super::Options;

        /// The blocking handle's `write_measured`.
        fn write_measured<T, E, F>(&self, f: F) -> Result<(T, WriteStats), E>
        where
            Self: BlockingDatabase,
            F: FnMut(&mut <Self as BlockingDatabase>::Connection) -> Result<T, E>,
            E: From<Error> + 'static;

        /// The blocking handle's `write`.
        fn write<T, E, F>(&self, f: F) -> Result<T, E>
        where
            Self: BlockingDatabase,
            F: FnMut(&mut <Self as BlockingDatabase>::Connection) -> Result<T, E>,
            E: From<Error> + 'static;

        /// The blocking handle's `read`.
        fn read<T, E, F>(&self, f: F) -> Result<T, E>
        where
            Self: BlockingDatabase,
            F: FnMut(&mut <Self as BlockingDatabase>::Connection) -> Result<T, E>,
            E: From<Error> + 'static;

        /// Runs `f` with a connection of the pool.
        fn interact<T>(
            &self,
            f: impl FnOnce(&mut <Self as BlockingDatabase>::Connection) -> T,
        ) -> Result<T>
        where
            Self: BlockingDatabase;
    }
}

/// A blocking handle that [`AsyncDatabase`] can serve: [`Database`](crate::Database)
/// (SQLite) or `PgDatabase` (PostgreSQL, feature `postgres`). Sealed: only this crate's
/// handles implement it.
pub trait BlockingDatabase: sealed::Sealed + fmt::Debug + Send + Sync + 'static {
    /// The connection the closures of [`AsyncDatabase::write`], [`AsyncDatabase::read`] and
    /// [`AsyncDatabase::interact`] are given.
    type Connection: 'static;
}

#[cfg(feature = "sqlite")]
impl sealed::Sealed for Database {
    const SYSTEM: &'static str = "sqlite";
    const SERIAL_WRITES: bool = true;

    fn namespace(&self) -> String {
        crate::escaped::Escaped::path(self.path()).to_string()
    }

    fn options(&self) -> &Options {
        Database::options(self)
    }

    fn write_measured<T, E, F>(&self, f: F) -> Result<(T, WriteStats), E>
    where
        F: FnMut(&mut diesel::SqliteConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        Database::write_measured(self, f)
    }

    fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnMut(&mut diesel::SqliteConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        Database::write(self, f)
    }

    fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnMut(&mut diesel::SqliteConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        Database::read(self, f)
    }

    fn interact<T>(&self, f: impl FnOnce(&mut diesel::SqliteConnection) -> T) -> Result<T> {
        self.with_connection(Operation::Connection, |conn| Ok(f(conn)))
    }
}

#[cfg(feature = "sqlite")]
impl BlockingDatabase for Database {
    type Connection = diesel::SqliteConnection;
}

#[cfg(feature = "postgres")]
impl sealed::Sealed for PgDatabase {
    const SYSTEM: &'static str = "postgresql";
    // The server runs writes side by side (`SERIALIZABLE`, run again on a conflict, and the
    // layer's own queue for writers that met one): queueing them here would only serialise
    // writes that do not conflict.
    const SERIAL_WRITES: bool = false;

    fn namespace(&self) -> String {
        crate::escaped::Escaped::new(self.url()).to_string()
    }

    fn options(&self) -> &Options {
        PgDatabase::options(self)
    }

    fn write_measured<T, E, F>(&self, f: F) -> Result<(T, WriteStats), E>
    where
        F: FnMut(&mut diesel::PgConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        PgDatabase::write_measured(self, f)
    }

    fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnMut(&mut diesel::PgConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        PgDatabase::write(self, f)
    }

    fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnMut(&mut diesel::PgConnection) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        PgDatabase::read(self, f)
    }

    fn interact<T>(&self, f: impl FnOnce(&mut diesel::PgConnection) -> T) -> Result<T> {
        let mut conn = self.connection()?;
        Ok(f(&mut conn))
    }
}

#[cfg(feature = "postgres")]
impl BlockingDatabase for PgDatabase {
    type Connection = diesel::PgConnection;
}

/// Generates the handle's definition, whose default engine is SQLite when SQLite is built.
macro_rules! async_database {
    ($($default:ty)?) => {
        /// A [`Database`](crate::Database) (or, with the feature `postgres`, a `PgDatabase`:
        /// `AsyncDatabase<PgDatabase>`) for async code: every call runs on tokio's blocking
        /// threads, at most as many at once as the pool has connections, so that no runtime
        /// worker ever waits for a lock; on SQLite, the writes of one handle queue in arrival
        /// order and run one after another. Cheap to clone; the clones share the database.
        ///
        /// It works alike on a multi-thread and a current-thread runtime, in a `LocalSet` and
        /// under `Handle::block_on`, and never panics for the context it is called in.
        ///
        /// # Engines
        /// `AsyncDatabase` (that is, `AsyncDatabase<Database>`) serves SQLite, and
        /// `AsyncDatabase<PgDatabase>` (opened with `AsyncDatabase::open_postgres`, or made
        /// from a `PgDatabase` with `From`) PostgreSQL, with the same calls and the same
        /// contract. On SQLite, the writes of one handle queue in arrival order (a write in
        /// the queue holds no thread) and run one after another on one blocking thread at a
        /// time, which goes on to the next queued write at once: SQLite runs one write at a
        /// time, and a write waiting for the lock would hold a blocking thread and a pooled
        /// connection. On PostgreSQL they do not queue: the server runs writes side by side,
        /// and writes that conflict are run again (or queue on the layer's write queue), so
        /// a queue here would only serialise writes that do not conflict. On both, the pool
        /// size bounds the calls that run at once (on SQLite the queued writes count as one).
        ///
        /// # Nested calls
        /// A call made from inside another call's closure, on its thread (awaited with
        /// `Handle::block_on` or another executor), runs there at once, as the blocking API's
        /// would. On the same database (any clone of the handle) it is refused with
        /// [`Error::Reentrant`] at once, whichever of `write`, `write_measured`, `read` and
        /// `interact` it is and whichever it is inside: it would wait for the queue, the slot
        /// or the lock the outer call holds. On another database it runs, without taking one
        /// of that handle's slots.
        ///
        /// # Cancellation
        /// Dropping the future of a `write`, `read` or `interact` (a timeout, a `select!`, a
        /// client that went away) is safe on either engine and either runtime flavour, and
        /// what happened is one of two things:
        /// - the call had not begun (it was waiting in the queue of writes or for a slot, or
        ///   its blocking task had not started): it never runs; nothing of it reaches the
        ///   database;
        /// - it had begun: it runs to its end, as the blocking API would, and its
        ///   transaction is committed or rolled back, never left open, its connection
        ///   returned to the pool clean. Its outcome is logged at `info` (`operation`,
        ///   `outcome`: `committed`, `failed` or `panicked`, with `db.system.name` and
        ///   `db.namespace`) whenever its future was not there to receive it: dropped while
        ///   the call ran, or after it finished but before the future saw it. A write whose
        ///   future was dropped is thus either returned or logged, never neither.
        ///
        /// So after a drop, a caller may assume only that the write was applied at most
        /// once, and entirely or not at all; to know which, make the write idempotent or
        /// look for its effect. A write is never applied twice: the layer retries a closure
        /// only after its transaction rolled back.
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
        #[derive(Debug)]
        pub struct AsyncDatabase<D: BlockingDatabase $(= $default)?> {
            shared: Arc<Shared<D>>,
        }
    };
}

#[cfg(feature = "sqlite")]
async_database!(Database);
// Without SQLite there is no default: enabling `sqlite` later must not change what
// `AsyncDatabase` means in code that names the engine.
#[cfg(not(feature = "sqlite"))]
async_database!();

/// What the clones of one [`AsyncDatabase`] share.
#[derive(Debug)]
struct Shared<D> {
    database: D,
    /// Tells this handle (and its clones) apart in the thread's record of the operations it
    /// is inside: a nested call on it is refused, whatever the engine records itself.
    id: u64,
    /// One permit per pooled connection: how many calls run on blocking threads at once.
    slots: Arc<Semaphore>,
    /// On SQLite, this handle's writes, run one after another.
    writes: Option<Arc<Writes>>,
    /// The database as the events show it.
    namespace: Arc<str>,
}

impl<D: BlockingDatabase> Clone for AsyncDatabase<D> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<D: BlockingDatabase> From<D> for AsyncDatabase<D> {
    fn from(database: D) -> Self {
        let slots = database.options().pool_size as usize;
        let namespace = database.namespace().into();
        Self {
            shared: Arc::new(Shared {
                id: next_id(),
                slots: Arc::new(Semaphore::new(slots)),
                writes: D::SERIAL_WRITES.then(Arc::default),
                namespace,
                database,
            }),
        }
    }
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
    /// Its future was dropped while it ran: its blocking task logs the outcome.
    Orphaned,
    /// Over, with this outcome, which its future has not received yet: if the future is
    /// dropped now, its drop logs the outcome.
    Finished(&'static str),
    /// Over, its outcome handed to its future or logged.
    Done,
}

/// One call's phase and what its log line names.
struct Call {
    phase: Mutex<Phase>,
    operation: Operation,
    system: &'static str,
    namespace: Arc<str>,
}

impl Call {
    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The outcome of a call nobody is left to receive.
    fn log(&self, outcome: &str) {
        tracing::info!(
            db.system.name = self.system,
            db.namespace = %self.namespace,
            operation = self.operation.as_str(),
            outcome,
            "finished after its caller dropped it"
        );
    }
}

/// Held by a call's future: marks the call abandoned or orphaned if the future is dropped
/// before it finishes, and logs the outcome if it is dropped after the call finished but
/// before it received the outcome.
struct Watch(Arc<Call>);

impl Drop for Watch {
    fn drop(&mut self) {
        let mut phase = self.0.phase();
        match *phase {
            Phase::Waiting => *phase = Phase::Abandoned,
            Phase::Running => *phase = Phase::Orphaned,
            Phase::Finished(outcome) => {
                *phase = Phase::Done;
                drop(phase);
                self.0.log(outcome);
            }
            Phase::Abandoned | Phase::Orphaned | Phase::Done => {}
        }
    }
}

#[cfg(feature = "sqlite")]
impl AsyncDatabase<Database> {
    /// Opens the database at `path` with [`Options::new`], as [`Database::open`] does, on a
    /// blocking thread: the migrations run off the runtime's workers.
    ///
    /// # Errors
    /// As [`Options::open`]; [`Error::Cancelled`] if the runtime is shutting down.
    pub async fn open<S>(path: impl AsRef<std::path::Path>, migrations: S) -> Result<Self>
    where
        S: diesel::migration::MigrationSource<diesel::sqlite::Sqlite> + Send + 'static,
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
        path: impl AsRef<std::path::Path>,
        migrations: S,
    ) -> Result<Self>
    where
        S: diesel::migration::MigrationSource<diesel::sqlite::Sqlite> + Send + 'static,
    {
        let path = path.as_ref().to_owned();
        opened(move || options.open(path, migrations)).await
    }
}

#[cfg(feature = "postgres")]
impl AsyncDatabase<PgDatabase> {
    /// Opens the PostgreSQL database at `url` with [`Options::new`], as `PgDatabase::open`
    /// does, on a blocking thread: the migrations run off the runtime's workers.
    ///
    /// # Errors
    /// As [`Options::open_postgres`]; [`Error::Cancelled`] if the runtime is shutting down.
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub async fn open_postgres<S>(url: &str, migrations: S) -> Result<Self>
    where
        S: diesel::migration::MigrationSource<diesel::pg::Pg> + Send + 'static,
    {
        Self::open_postgres_with(Options::new(), url, migrations).await
    }

    /// Opens the PostgreSQL database at `url` with `options`, as
    /// [`Options::open_postgres`] does, on a blocking thread.
    ///
    /// # Errors
    /// As [`Options::open_postgres`]; [`Error::Cancelled`] if the runtime is shutting down.
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub async fn open_postgres_with<S>(options: Options, url: &str, migrations: S) -> Result<Self>
    where
        S: diesel::migration::MigrationSource<diesel::pg::Pg> + Send + 'static,
    {
        let url = url.to_owned();
        opened(move || options.open_postgres(&url, migrations)).await
    }
}

/// Runs `open` on a blocking thread and wraps the handle it opens.
async fn opened<D: BlockingDatabase>(
    open: impl FnOnce() -> Result<D> + Send + 'static,
) -> Result<AsyncDatabase<D>> {
    match ::tokio::task::spawn_blocking(open).await {
        Ok(opened) => opened.map(AsyncDatabase::from),
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(Error::Cancelled {
            operation: Operation::Migrate,
        }),
    }
}

impl<D: BlockingDatabase> AsyncDatabase<D> {
    /// The blocking handle's `write` on a blocking thread: on SQLite `f` runs in
    /// `BEGIN IMMEDIATE`, on PostgreSQL in a `SERIALIZABLE` transaction, again as a whole on
    /// a lock error or a conflict, and commits.
    ///
    /// # Errors
    /// As [`Database::write`](crate::Database::write) (or `PgDatabase::write`);
    /// [`Error::Reentrant`] inside a call of this database on this thread (see the type's
    /// docs); [`Error::Cancelled`] if the runtime is shutting down.
    ///
    /// # Panics
    /// If `f` panics, with its panic, once its transaction rolled back; the handle and its
    /// pool stay usable.
    pub async fn write<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        F: FnMut(&mut D::Connection) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        self.run(Operation::Write, move |db| sealed::Sealed::write(db, f))
            .await
    }

    /// [`write`](AsyncDatabase::write), also returning how long it waited for the lock and
    /// how many attempts it took. The wait for a turn or a blocking slot is not in it.
    ///
    /// # Errors
    /// As [`write`](AsyncDatabase::write).
    ///
    /// # Panics
    /// As [`write`](AsyncDatabase::write).
    pub async fn write_measured<T, E, F>(&self, f: F) -> std::result::Result<(T, WriteStats), E>
    where
        F: FnMut(&mut D::Connection) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        self.run(Operation::Write, move |db| {
            sealed::Sealed::write_measured(db, f)
        })
        .await
    }

    /// The blocking handle's `read` on a blocking thread: on SQLite `f` runs in a read
    /// transaction with `query_only` on, on PostgreSQL in `REPEATABLE READ READ ONLY`.
    ///
    /// # Errors
    /// As [`Database::read`](crate::Database::read) (or `PgDatabase::read`);
    /// [`Error::Reentrant`] and [`Error::Cancelled`] as for [`write`](AsyncDatabase::write).
    ///
    /// # Panics
    /// If `f` panics, with its panic.
    pub async fn read<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        F: FnMut(&mut D::Connection) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        self.run(Operation::Read, move |db| sealed::Sealed::read(db, f))
            .await
    }

    /// Runs `f` with a connection of the pool, on a blocking thread: for work that needs one
    /// directly (on SQLite, use `immediate_transaction` for anything that writes, as with
    /// [`Database::connection`](crate::Database::connection)).
    ///
    /// # Errors
    /// As the blocking handle's `connection`; [`Error::Reentrant`] and [`Error::Cancelled`]
    /// as for [`write`](AsyncDatabase::write).
    ///
    /// # Panics
    /// If `f` panics, with its panic.
    pub async fn interact<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut D::Connection) -> T + Send + 'static,
        T: Send + 'static,
    {
        self.run(Operation::Connection, move |db| {
            sealed::Sealed::interact(db, f)
        })
        .await
    }

    /// The blocking handle, for code that runs on a blocking thread already.
    pub fn blocking(&self) -> &D {
        &self.shared.database
    }

    /// Runs `call` on a blocking thread, cancellation-safe: a write on SQLite through the
    /// handle's queue of writes, anything else once a slot is free; or here, at once, if this
    /// thread is inside a call already.
    async fn run<T, E, C>(&self, operation: Operation, call: C) -> std::result::Result<T, E>
    where
        C: FnOnce(&D) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let shared = &self.shared;
        if Inside::current().is_some() {
            // This thread is inside a call of this layer: the future is awaited from its
            // closure, by a blocking executor. Waiting for the queue, a slot or a blocking
            // thread the outer call may hold would never end; the blocking API's answer is
            // at hand instead (`Error::Reentrant` on the same database).
            let _inside = Inside::enter(shared.id, operation)?;
            return call(&shared.database);
        }
        let watch = Watch(Arc::new(Call {
            phase: Mutex::new(Phase::Waiting),
            operation,
            system: D::SYSTEM,
            namespace: Arc::clone(&shared.namespace),
        }));
        let work = {
            let (state, shared) = (Arc::clone(&watch.0), Arc::clone(shared));
            move || attempt(&state, operation, || call(&shared.database), shared.id)
        };
        let ended = match (&shared.writes, operation) {
            (Some(writes), Operation::Write) => {
                let (sender, receiver) = ::tokio::sync::oneshot::channel();
                writes.submit(
                    Box::new(move || {
                        // A dropped receiver: its future's drop logged the outcome (or the
                        // work did, if the future was dropped while it ran).
                        let _ = sender.send(work());
                    }),
                    &shared.slots,
                );
                // An error: the queue was dropped with the write in it, unrun (the runtime
                // shut down before its runner started).
                receiver.await.ok()
            }
            _ => {
                let permit = Arc::clone(&shared.slots)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let task = ::tokio::task::spawn_blocking(move || {
                    // The slot is held until the blocking work ends, even if the future is
                    // dropped meanwhile.
                    let _permit = permit;
                    work()
                });
                match task.await {
                    Ok(ended) => Some(ended),
                    Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                    // The runtime shut down before the task started.
                    Err(_) => None,
                }
            }
        };
        // From here the outcome is this future's: dropping `watch` changes nothing.
        *watch.0.phase() = Phase::Done;
        drop(watch);
        match ended {
            Some(Some(Ok(result))) => result,
            Some(Some(Err(panic))) => std::panic::resume_unwind(panic),
            // Only a dropped future abandons a call (`Some(None)`), and a dropped future
            // awaits nothing.
            Some(None) | None => Err(E::from(Error::Cancelled { operation })),
        }
    }
}

/// Runs one call on the blocking thread it was handed to, unless its future was dropped
/// before: `None` then. The outcome is logged here if the future was dropped while it ran;
/// if it is dropped after, its drop logs it.
fn attempt<R>(
    state: &Call,
    operation: Operation,
    call: impl FnOnce() -> R,
    handle: u64,
) -> Option<std::thread::Result<R>>
where
    R: Outcome,
{
    {
        let mut phase = state.phase();
        if *phase == Phase::Abandoned {
            tracing::debug!(
                operation = operation.as_str(),
                "dropped before it began: not run"
            );
            return None;
        }
        *phase = Phase::Running;
    }
    let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Refuses a call of this handle nested in this one, awaited by a blocking executor.
        match Inside::enter(handle, operation) {
            Ok(_inside) => call(),
            Err(error) => R::refused(error),
        }
    }));
    let outcome = match &ended {
        Ok(result) if result.is_ok() => "committed",
        Ok(_) => "failed",
        Err(_) => "panicked",
    };
    let mut phase = state.phase();
    if *phase == Phase::Orphaned {
        *phase = Phase::Done;
        drop(phase);
        state.log(outcome);
    } else {
        // Its future receives it, or logs it if dropped first.
        *phase = Phase::Finished(outcome);
    }
    Some(ended)
}

/// A call's result, as [`attempt`] needs it.
trait Outcome {
    fn is_ok(&self) -> bool;
    fn refused(error: Error) -> Self;
}

impl<T, E: From<Error>> Outcome for std::result::Result<T, E> {
    fn is_ok(&self) -> bool {
        std::result::Result::is_ok(self)
    }

    fn refused(error: Error) -> Self {
        Err(E::from(error))
    }
}

/// A write, ready to run on the queue's blocking thread.
type Job = Box<dyn FnOnce() + Send>;

/// On SQLite, a handle's writes, in arrival order, run one after another by one blocking
/// thread at a time (the runner): SQLite runs one write at a time anyway, a write waiting
/// in the queue holds no thread, and a runner that finds the next write waiting runs it at
/// once, without handing it to another thread and back.
#[derive(Debug, Default)]
struct Writes {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    jobs: std::collections::VecDeque<Job>,
    /// Whether a runner is started and has not yet found the queue empty.
    running: bool,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("jobs", &self.jobs.len())
            .field("running", &self.running)
            .finish()
    }
}

impl Writes {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `job`, and starts a runner on a blocking thread unless one is running.
    fn submit(self: &Arc<Self>, job: Job, slots: &Arc<Semaphore>) {
        {
            let mut queue = self.queue();
            queue.jobs.push_back(job);
            if queue.running {
                return;
            }
            queue.running = true;
        }
        let runner = Runner {
            writes: Arc::clone(self),
            slots: Arc::clone(slots),
            drained: false,
        };
        // If the runtime is shutting down, the runner is dropped unrun: see its drop.
        drop(::tokio::task::spawn_blocking(move || runner.run()));
    }
}

/// Runs a handle's queued writes until the queue is empty, holding one slot meanwhile.
struct Runner {
    writes: Arc<Writes>,
    slots: Arc<Semaphore>,
    /// Whether it found the queue empty and said so.
    drained: bool,
}

impl Runner {
    fn run(mut self) {
        // A blocking thread, outside the runtime: it may wait here. The writes are counted
        // among the calls that run at once, as one.
        let _permit = ::tokio::runtime::Handle::current()
            .block_on(Arc::clone(&self.slots).acquire_owned())
            .expect("the semaphore is never closed");
        loop {
            let job = {
                let mut queue = self.writes.queue();
                match queue.jobs.pop_front() {
                    Some(job) => job,
                    None => {
                        queue.running = false;
                        self.drained = true;
                        return;
                    }
                }
            };
            // A job catches its closure's panic; it does not unwind.
            job();
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if !self.drained {
            // Dropped unrun (the runtime is shutting down): the queued writes never run,
            // their futures return `Error::Cancelled`, and the next write starts a runner.
            let jobs = {
                let mut queue = self.writes.queue();
                queue.running = false;
                std::mem::take(&mut queue.jobs)
            };
            drop(jobs);
        }
    }
}
